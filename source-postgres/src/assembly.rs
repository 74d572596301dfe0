//! Transaction assembly, without I/O: the decoded changes of one source transaction become
//! per-table change rows, cut into chunks when the transaction is large, and then the
//! ordered [`Step`]s that stage it (each piece under its sequence, `open` while more of
//! the transaction follows) and apply its TRUNCATEs. The streaming code (`source`) feeds a
//! [`Txn`] and carries out the steps against its sink; everything here is tested without a
//! server.
//!
//! Also the one rule for which column changes of a relation are mirrored without stopping
//! ([`appended`], [`relation_change`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use freshet_common::changes::{OP_DELETE, OP_UPSERT};

use crate::pgoutput::{OldTuple, Value};

/// A change row: op and values in PostgreSQL column order.
pub type Row = (i8, Vec<Value>);

/// Decoded bytes of a transaction staged as one chunk once reached. A constant, not a
/// setting: a transaction re-sent after a crash must be cut at the same places so that its
/// chunks get the same sequences (and those already staged are skipped).
pub const CHUNK_BYTES: usize = 16 * 1024 * 1024;

/// The sequence of piece `n` of what a source stages at `lsn`: `lsn << 16 | n` (pieces of
/// one transaction for one table, or chunks of one table's copy).
pub fn seq(lsn: u64, n: u64) -> u64 {
    (lsn << 16) | n
}

/// How many columns `new` appends to `old`: `Some(n)` when `new` is `old` followed by `n`
/// more columns (0: the same), `None` for any other change (a column dropped, the last one
/// included, renamed, retyped or moved). The one rule for which column changes are
/// mirrored without stopping, since a Delta table can only grow at the end.
pub fn appended<T: PartialEq>(old: &[T], new: &[T]) -> Option<usize> {
    (new.len() >= old.len() && new[..old.len()] == *old).then(|| new.len() - old.len())
}

/// Judges a relation message's columns `rel` against the table as mirrored (`known`) and
/// the table's previous relation message of this session (`last`), by [`appended`]:
/// `Some(n)` when it can be mirrored, `n` columns to add first (0: the same columns, or
/// an older, shorter shape replayed, which `replayed` says is possible: the transaction
/// committed before the table was described); `None` when not (a dropped, renamed,
/// retyped or moved column, or a shape that does not extend the session's last one).
pub fn relation_change<T: PartialEq>(
    known: &[T],
    last: Option<&[T]>,
    rel: &[T],
    replayed: bool,
) -> Option<usize> {
    if last.is_some_and(|last| appended(last, rel).is_none()) {
        return None;
    }
    match appended(known, rel) {
        Some(n) => Some(n),
        // Shorter: an older shape replayed, only from before the table was described;
        // later, columns were dropped.
        None if replayed && appended(rel, known).is_some() => Some(0),
        None => None,
    }
}

/// An UPDATE as change rows: when the key changed, the delete of the old key (to be staged
/// first), and the new values with unchanged TOASTed values taken from the old row when it
/// is whole (REPLICA IDENTITY FULL: a key-only old tuple holds nulls there instead). Values
/// still [`Value::Unchanged`] in the result must be read from the table.
pub fn update(
    key: &[usize],
    old: Option<OldTuple>,
    mut new: Vec<Value>,
) -> (Option<Row>, Vec<Value>) {
    let Some(old) = old else {
        return (None, new);
    };
    let key_of = |v: &[Value]| key.iter().map(|i| v[*i].clone()).collect::<Vec<_>>();
    let gone = (key_of(old.values()) != key_of(&new)).then(|| (OP_DELETE, old.values().to_vec()));
    if let OldTuple::Row(row) = &old {
        for (j, v) in new.iter_mut().enumerate() {
            if *v == Value::Unchanged && !matches!(row[j], Value::Unchanged) {
                *v = row[j].clone();
            }
        }
    }
    (gone, new)
}

/// One decoded transaction's work, in order.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Rows(usize, Vec<Row>),
    Truncate(usize),
}

impl Event {
    fn table(&self) -> usize {
        match self {
            Event::Rows(t, _) | Event::Truncate(t) => *t,
        }
    }
}

/// What staging a transaction (or a chunk of it) takes, in order. Tables are indexes of the
/// source's mirrored tables.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Stage `rows` for `table` under `sequence`; `open`: more of the transaction follows,
    /// and none of it may be applied before the table's last piece (not open) is staged.
    Stage {
        table: usize,
        sequence: u64,
        rows: Vec<Row>,
        open: bool,
    },
    /// Empty `table` at `sequence` (after its pieces staged before).
    Truncate { table: usize, sequence: u64 },
}

/// One source transaction being assembled: its changes since the last chunk, the bytes
/// they took on the stream, and per table the sequences handed out and whether a chunk is
/// staged open.
#[derive(Debug)]
pub struct Txn {
    /// The transaction's commit position (its sequences are derived from it).
    commit_lsn: u64,
    chunk_bytes: usize,
    events: Vec<Event>,
    bytes: usize,
    /// Per table: sequences handed out so far.
    n: HashMap<usize, u64>,
    /// Tables with an open chunk staged (their last piece must close it).
    open: BTreeSet<usize>,
}

impl Txn {
    /// A transaction committing at `commit_lsn`, cut into chunks of `chunk_bytes` (of
    /// stream messages; [`CHUNK_BYTES`] when streaming).
    pub fn new(commit_lsn: u64, chunk_bytes: usize) -> Self {
        Txn {
            commit_lsn,
            chunk_bytes,
            events: Vec::new(),
            bytes: 0,
            n: HashMap::new(),
            open: BTreeSet::new(),
        }
    }

    /// A stream message of `len` bytes arrived (before it is decoded). When the messages
    /// before it reached the chunk size, what they held is a chunk: returns the steps that
    /// stage it open (without the tables `skip` names: their snapshot holds the
    /// transaction), else nothing.
    pub fn message(&mut self, len: usize, skip: impl Fn(usize) -> bool) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.bytes >= self.chunk_bytes {
            let events = self.take(skip);
            steps = self.plan(events, false);
            self.bytes = 0;
        }
        self.bytes += len;
        steps
    }

    /// The transaction's commit position (from its Begin).
    pub fn commit_lsn(&self) -> u64 {
        self.commit_lsn
    }

    /// An INSERT.
    pub fn insert(&mut self, table: usize, new: Vec<Value>) {
        self.push(table, (OP_UPSERT, new));
    }

    /// An UPDATE, its key columns `key` (see [`update`]): `None` once its rows are in, or
    /// the new values when some are still unchanged TOASTed values without an old value,
    /// which the caller reads from the table before it hands the row back with
    /// [`Txn::upsert`] (or, when the row is gone, [`Txn::delete`]).
    pub fn update(
        &mut self,
        table: usize,
        key: &[usize],
        old: Option<OldTuple>,
        new: Vec<Value>,
    ) -> Option<Vec<Value>> {
        let (gone, new) = update(key, old, new);
        if let Some(gone) = gone {
            self.push(table, gone);
        }
        if new.contains(&Value::Unchanged) {
            return Some(new);
        }
        self.upsert(table, new);
        None
    }

    /// The new values of a row (an update's, once complete).
    pub fn upsert(&mut self, table: usize, new: Vec<Value>) {
        self.push(table, (OP_UPSERT, new));
    }

    /// A DELETE (the key's values are what matters).
    pub fn delete(&mut self, table: usize, old: Vec<Value>) {
        self.push(table, (OP_DELETE, old));
    }

    /// A TRUNCATE of `table`: what precedes it is applied before it.
    pub fn truncate(&mut self, table: usize) {
        self.events.push(Event::Truncate(table));
    }

    /// The transaction commits at `commit_lsn`: the steps that stage what is left of it
    /// (without the tables `skip` names) and close every table a chunk left open (with an
    /// empty piece when it has no rows left). Nothing: the transaction changed nothing to
    /// stage.
    pub fn commit(mut self, commit_lsn: u64, skip: impl Fn(usize) -> bool) -> Vec<Step> {
        self.commit_lsn = commit_lsn;
        let events = self.take(skip);
        self.plan(events, true)
    }

    fn push(&mut self, table: usize, row: Row) {
        if let Some(Event::Rows(j, rows)) = self.events.last_mut() {
            if *j == table {
                rows.push(row);
                return;
            }
        }
        self.events.push(Event::Rows(table, vec![row]));
    }

    fn take(&mut self, skip: impl Fn(usize) -> bool) -> Vec<Event> {
        std::mem::take(&mut self.events)
            .into_iter()
            .filter(|e| !skip(e.table()))
            .collect()
    }

    fn next(&mut self, t: usize) -> u64 {
        let e = self.n.entry(t).or_insert(0);
        *e += 1;
        seq(self.commit_lsn, *e)
    }

    /// The steps for `events` (rows accumulate per table until a TRUNCATE of that table or
    /// the end of the chunk); with `last`, the transaction ends here and every open table is
    /// closed.
    fn plan(&mut self, events: Vec<Event>, last: bool) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut pending: BTreeMap<usize, Vec<Row>> = BTreeMap::new();
        for ev in events {
            match ev {
                Event::Rows(t, rows) => pending.entry(t).or_default().extend(rows),
                Event::Truncate(t) => {
                    // What precedes a TRUNCATE is applied before it (its own commit).
                    let rows = pending.remove(&t).unwrap_or_default();
                    if !rows.is_empty() || self.open.contains(&t) {
                        let sequence = self.next(t);
                        steps.push(Step::Stage {
                            table: t,
                            sequence,
                            rows,
                            open: false,
                        });
                        self.open.remove(&t);
                    }
                    let sequence = self.next(t);
                    steps.push(Step::Truncate { table: t, sequence });
                }
            }
        }
        if last {
            for t in &self.open {
                pending.entry(*t).or_default();
            }
        }
        for (t, rows) in pending {
            let sequence = self.next(t);
            steps.push(Step::Stage {
                table: t,
                sequence,
                rows,
                open: !last,
            });
            if last {
                self.open.remove(&t);
            } else {
                self.open.insert(t);
            }
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: i8 = OP_UPSERT;
    const D: i8 = OP_DELETE;
    const LSN: u64 = 0x1234;

    fn v(vals: &[&str]) -> Vec<Value> {
        vals.iter()
            .map(|s| match *s {
                "NULL" => Value::Null,
                "~" => Value::Unchanged,
                s => Value::Text(s.to_string()),
            })
            .collect()
    }

    fn stage(table: usize, n: u64, rows: Vec<Row>, open: bool) -> Step {
        Step::Stage {
            table,
            sequence: seq(LSN, n),
            rows,
            open,
        }
    }

    fn none(_: usize) -> bool {
        false
    }

    #[test]
    fn inserts_updates_and_deletes_of_one_table_are_one_batch() {
        let mut t = Txn::new(LSN, CHUNK_BYTES);
        t.insert(0, v(&["1", "a"]));
        t.insert(0, v(&["2", "b"]));
        // The key stays: an upsert; a key-only old tuple (identity DEFAULT) adds nothing.
        assert_eq!(
            t.update(
                0,
                &[0],
                Some(OldTuple::Key(v(&["1", "NULL"]))),
                v(&["1", "c"])
            ),
            None
        );
        assert_eq!(t.update(0, &[0], None, v(&["2", "d"])), None);
        t.delete(0, v(&["2", "NULL"]));
        let steps = t.commit(LSN, none);
        assert_eq!(
            steps,
            vec![stage(
                0,
                1,
                vec![
                    (U, v(&["1", "a"])),
                    (U, v(&["2", "b"])),
                    (U, v(&["1", "c"])),
                    (U, v(&["2", "d"])),
                    (D, v(&["2", "NULL"])),
                ],
                false
            )]
        );
    }

    #[test]
    fn a_key_change_deletes_the_old_key_first_and_keeps_unchanged_values() {
        let mut t = Txn::new(LSN, CHUNK_BYTES);
        // REPLICA IDENTITY FULL: the old row fills the unchanged TOASTed value.
        let old = OldTuple::Row(v(&["1", "big", "x"]));
        assert_eq!(t.update(0, &[0], Some(old), v(&["5", "~", "y"])), None);
        // Identity DEFAULT, key changed: the unchanged value must be read from the table.
        let old = OldTuple::Key(v(&["2", "NULL", "NULL"]));
        let left = t.update(0, &[0], Some(old), v(&["6", "~", "z"]));
        assert_eq!(left, Some(v(&["6", "~", "z"])));
        t.upsert(0, v(&["6", "read", "z"]));
        assert_eq!(
            t.commit(LSN, none),
            vec![stage(
                0,
                1,
                vec![
                    (D, v(&["1", "big", "x"])),
                    (U, v(&["5", "big", "y"])),
                    (D, v(&["2", "NULL", "NULL"])),
                    (U, v(&["6", "read", "z"])),
                ],
                false
            )]
        );
    }

    #[test]
    fn a_truncate_in_the_middle_splits_its_table_and_leaves_the_other_alone() {
        let mut t = Txn::new(LSN, CHUNK_BYTES);
        t.insert(0, v(&["1"]));
        t.insert(1, v(&["10"]));
        t.insert(0, v(&["2"]));
        t.truncate(0);
        t.insert(0, v(&["3"]));
        t.insert(1, v(&["11"]));
        // A table truncated with nothing before it: just the truncate.
        t.truncate(2);
        assert_eq!(
            t.commit(LSN, none),
            vec![
                // Table 0's rows before its TRUNCATE, then the TRUNCATE.
                stage(0, 1, vec![(U, v(&["1"])), (U, v(&["2"]))], false),
                Step::Truncate {
                    table: 0,
                    sequence: seq(LSN, 2)
                },
                Step::Truncate {
                    table: 2,
                    sequence: seq(LSN, 1)
                },
                // What follows, per table in table order; table 1 in one piece.
                stage(0, 3, vec![(U, v(&["3"]))], false),
                stage(1, 1, vec![(U, v(&["10"])), (U, v(&["11"]))], false),
            ]
        );
    }

    #[test]
    fn tables_whose_snapshot_holds_the_transaction_are_skipped() {
        let mut t = Txn::new(LSN, CHUNK_BYTES);
        t.insert(0, v(&["1"]));
        t.insert(1, v(&["2"]));
        t.truncate(1);
        assert_eq!(
            t.commit(LSN, |table| table == 1),
            vec![stage(0, 1, vec![(U, v(&["1"]))], false)]
        );
        // Nothing left: nothing to stage.
        let mut t = Txn::new(LSN, CHUNK_BYTES);
        t.insert(1, v(&["2"]));
        assert_eq!(t.commit(LSN, |table| table == 1), vec![]);
        assert_eq!(Txn::new(LSN, CHUNK_BYTES).commit(LSN, none), vec![]);
    }

    #[test]
    fn a_transaction_over_the_chunk_size_is_staged_open_then_closed() {
        // Chunks of 100 bytes of messages; each message here is 40 bytes.
        let mut t = Txn::new(LSN, 100);
        let mut steps = Vec::new();
        fn change(t: &mut Txn, steps: &mut Vec<Step>, f: &dyn Fn(&mut Txn)) {
            steps.extend(t.message(40, none));
            f(t);
        }
        change(&mut t, &mut steps, &|t| t.insert(0, v(&["1"])));
        change(&mut t, &mut steps, &|t| t.insert(1, v(&["10"])));
        change(&mut t, &mut steps, &|t| t.insert(0, v(&["2"])));
        assert_eq!(steps, vec![], "120 bytes are counted, not yet cut");
        // The fourth message: the three before it are a chunk, both tables open.
        change(&mut t, &mut steps, &|t| t.insert(0, v(&["3"])));
        assert_eq!(
            std::mem::take(&mut steps),
            vec![
                stage(0, 1, vec![(U, v(&["1"])), (U, v(&["2"]))], true),
                stage(1, 1, vec![(U, v(&["10"]))], true),
            ]
        );
        change(&mut t, &mut steps, &|t| t.truncate(0));
        change(&mut t, &mut steps, &|t| t.insert(0, v(&["4"])));
        // Cut again: table 0's open piece is closed before its TRUNCATE.
        change(&mut t, &mut steps, &|t| t.delete(0, v(&["4"])));
        assert_eq!(
            std::mem::take(&mut steps),
            vec![
                stage(0, 2, vec![(U, v(&["3"]))], false),
                Step::Truncate {
                    table: 0,
                    sequence: seq(LSN, 3)
                },
                stage(0, 4, vec![(U, v(&["4"]))], true),
            ]
        );
        // The commit closes both tables; table 1 has nothing left: an empty piece.
        assert_eq!(
            t.commit(LSN, none),
            vec![
                stage(0, 5, vec![(D, v(&["4"]))], false),
                stage(1, 2, vec![], false),
            ]
        );
    }

    #[test]
    fn a_chunk_of_skipped_tables_stages_nothing() {
        let mut t = Txn::new(LSN, 10);
        assert_eq!(t.message(20, none), vec![]);
        t.insert(0, v(&["1"]));
        assert_eq!(t.message(20, |_| true), vec![]);
        t.insert(0, v(&["2"]));
        assert_eq!(t.commit(LSN, |_| true), vec![]);
    }

    #[test]
    fn sequences_put_the_piece_below_the_commit_position() {
        assert_eq!(seq(1, 0), 1 << 16);
        assert_eq!(seq(0x10, 3), 0x10_0003);
        assert!(seq(5, 0xffff) < seq(6, 0));
    }

    #[test]
    fn only_columns_added_at_the_end_are_append_only() {
        assert_eq!(appended(&["id", "a"], &["id", "a"]), Some(0));
        assert_eq!(appended(&["id", "a"], &["id", "a", "b", "c"]), Some(2));
        // Dropping the last column, or any other.
        assert_eq!(appended(&["id", "a", "b"], &["id", "a"]), None);
        assert_eq!(appended(&["id", "a", "b"], &["id", "b"]), None);
        // Renamed or moved.
        assert_eq!(appended(&["id", "a"], &["id", "x"]), None);
        assert_eq!(appended(&["id", "a"], &["a", "id"]), None);
        assert_eq!(appended(&["id", "a"], &["id", "x", "a"]), None);
    }

    #[test]
    fn relation_changes_are_judged_by_the_same_rule() {
        let known = ["id", "a", "b"];
        // The same, or columns added at the end.
        assert_eq!(relation_change(&known, None, &known, false), Some(0));
        assert_eq!(
            relation_change(&known, None, &["id", "a", "b", "c"], false),
            Some(1)
        );
        // A shorter shape: replayed from before the table was described, or a drop.
        assert_eq!(relation_change(&known, None, &["id", "a"], true), Some(0));
        assert_eq!(relation_change(&known, None, &["id", "a"], false), None);
        assert_eq!(relation_change(&known, None, &["id", "b"], true), None);
        // Renamed.
        assert_eq!(relation_change(&known, None, &["id", "a", "x"], true), None);
        // Within a session each relation message must extend the last one: shrinking after
        // a longer shape was seen is a drop, even for a replayed transaction.
        let last: &[&str] = &["id", "a", "b"];
        assert_eq!(
            relation_change(&known, Some(last), &["id", "a"], true),
            None
        );
        assert_eq!(
            relation_change(&known, Some(last), &["id", "a", "b", "c"], false),
            Some(1)
        );
    }
}
