//! Every kind of invalid batch is rejected with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED)
//! naming the problem, and the staging log is unchanged.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use freshet_integration_tests::*;
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_request::Payload;
use tonic::Code;

fn arrow_req(cols: Vec<(&str, ArrayRef)>) -> IngestRequest {
    let b = RecordBatch::try_from_iter(cols).unwrap();
    IngestRequest {
        table: "t".into(),
        payload: Some(Payload::ArrowIpc(
            freshet_common::ipc::encode(&b.schema(), &[b.clone()]).unwrap(),
        )),
        op_column: "op".into(),
        ..Default::default()
    }
}

fn json_req(text: &str) -> IngestRequest {
    IngestRequest {
        table: "t".into(),
        payload: Some(Payload::JsonRows(text.into())),
        op_column: String::new(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_are_rejected_and_nothing_is_staged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", false, 1 << 20);
    let mut config = freshet_common::config::Config::default();
    config.tables = vec![cfg];
    config.cycle.interval_ms = 3_600_000;
    config.ingest.max_batch_rows = 100;
    let c = Cluster::start_with(config, 1).await;
    let mut ingest = c.ingest_client().await;
    // One good batch first, so the staging log is not empty.
    ingest
        .ingest(request("t", false, &[(1, Some(("a".into(), 1)))]))
        .await
        .unwrap();
    let staging = dir.path().join("t/_freshet/staging");
    let before = list_files(&staging);
    assert_eq!(before.len(), 1);

    let ids = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
    let strs = |v: Vec<Option<&str>>| Arc::new(StringArray::from(v)) as ArrayRef;
    let cases: Vec<(IngestRequest, Code, &str)> = vec![
        (
            arrow_req(vec![
                ("id", ids(vec![Some(1), None])),
                ("op", strs(vec![Some("u"), Some("u")])),
            ]),
            Code::InvalidArgument,
            "row 1: primary key column 'id' is null",
        ),
        (
            arrow_req(vec![("v", strs(vec![Some("x")]))]),
            Code::InvalidArgument,
            "missing primary key column 'id'",
        ),
        (
            arrow_req(vec![
                ("id", ids(vec![Some(1)])),
                ("colour", strs(vec![Some("red")])),
            ]),
            Code::InvalidArgument,
            "unknown column 'colour'",
        ),
        (
            arrow_req(vec![("id", strs(vec![Some("1")]))]),
            Code::InvalidArgument,
            "column 'id' has type Utf8, expected Int64",
        ),
        (
            arrow_req(vec![
                ("id", ids(vec![Some(1), Some(2)])),
                ("op", strs(vec![Some("upsert"), Some("merge")])),
            ]),
            Code::InvalidArgument,
            "row 1: column 'op' has unknown op 'merge'",
        ),
        (
            arrow_req(vec![("id", ids(vec![Some(1)])), ("op", strs(vec![None]))]),
            Code::InvalidArgument,
            "row 0: op column 'op' is null",
        ),
        (
            arrow_req(vec![("id", ids((0..101).map(Some).collect()))]),
            Code::ResourceExhausted,
            "101 rows, limit 100",
        ),
        (
            IngestRequest {
                table: "t".into(),
                payload: Some(Payload::ArrowIpc(b"not arrow".to_vec())),
                op_column: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "not a valid Arrow IPC stream",
        ),
        (
            IngestRequest {
                table: "t".into(),
                payload: None,
                op_column: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "no payload",
        ),
        (
            json_req(r#"[{"id": 1, "n": "seven"}]"#),
            Code::InvalidArgument,
            "row 0:",
        ),
        (
            json_req(
                r#"{"id": 1}
{"id": 2, "v": "x"
"#,
            ),
            Code::InvalidArgument,
            "line 2: malformed JSON",
        ),
        (
            IngestRequest {
                table: "nope".into(),
                payload: Some(Payload::JsonRows("[]".into())),
                op_column: String::new(),
                ..Default::default()
            },
            Code::NotFound,
            "no table named 'nope'",
        ),
    ];
    for (req, code, want) in cases {
        let status = ingest.ingest(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{want}: {}", status.message());
        assert!(
            status.message().contains(want),
            "want '{want}' in '{}'",
            status.message()
        );
    }
    assert_eq!(
        list_files(&staging),
        before,
        "nothing staged by rejected batches"
    );
    c.stop();
}

/// An ingest request of `rows` zeros in the key column: 8 bytes a row once decoded, a few
/// hundredths of that LZ4-compressed.
fn zeros_req(rows: usize) -> IngestRequest {
    arrow_req(vec![(
        "id",
        Arc::new(Int64Array::from(vec![0i64; rows])) as ArrayRef,
    )])
}

/// Rewrites the 8-byte uncompressed-length prefix `from` of the one LZ4 buffer of the
/// request's payload that declares it (the prefix sits right before the frame's magic).
fn forge_prefix(mut req: IngestRequest, from: i64, to: i64) -> IngestRequest {
    let Some(Payload::ArrowIpc(bytes)) = &mut req.payload else {
        unreachable!()
    };
    let (want, magic) = (from.to_le_bytes(), 0x184D_2204u32.to_le_bytes());
    let hits: Vec<usize> = (0..bytes.len() - 12)
        .filter(|&i| bytes[i..i + 8] == want && bytes[i + 8..i + 12] == magic)
        .collect();
    assert_eq!(hits.len(), 1, "one buffer declaring {from} bytes");
    bytes[hits[0]..hits[0] + 8].copy_from_slice(&to.to_le_bytes());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bombs_are_refused_before_decoding_and_nothing_is_staged() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = freshet_common::config::Config::default();
    config.tables = vec![table_config(dir.path(), "t", false, 1 << 20)];
    config.cycle.interval_ms = 3_600_000;
    config.ingest.max_batch_bytes = 1 << 20;
    let c = Cluster::start_with(config, 1).await;
    let mut ingest = c.ingest_client().await;
    // A compressed payload within the limit (80 KB decoded) is accepted.
    ingest.ingest(zeros_req(10_000)).await.unwrap();
    let staging = dir.path().join("t/_freshet/staging");
    let before = list_files(&staging);
    assert_eq!(before.len(), 1);

    // 1M rows: 8 MB once decoded, 8x the limit, in a payload of a few tens of KB.
    let bomb = zeros_req(1_000_000);
    let Some(Payload::ArrowIpc(b)) = &bomb.payload else {
        unreachable!()
    };
    assert!(b.len() < 64 << 10, "{} bytes on the wire", b.len());
    let cases: Vec<(&str, IngestRequest, Code, Vec<&str>)> = vec![
        (
            "honest LZ4 bomb",
            bomb.clone(),
            Code::ResourceExhausted,
            vec![
                "payload declares 8000256 bytes once decoded",
                "limit 1048576 (ingest.max_batch_bytes)",
            ],
        ),
        (
            "prefix understating the decoded size",
            forge_prefix(bomb, 8_000_000, 16),
            Code::InvalidArgument,
            vec!["buffer 1 declares 16 bytes once decompressed but decompresses to 8000000"],
        ),
        (
            "prefix declaring a terabyte",
            forge_prefix(zeros_req(1000), 8000, 1 << 40),
            Code::ResourceExhausted,
            vec![
                "payload declares 1099511628032 bytes once decoded",
                "(ingest.max_batch_bytes)",
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (what, req, code, want) in cases {
        let outcome = match ingest.ingest(req).await {
            Ok(r) => format!("accepted as sequence {}", r.into_inner().sequence),
            Err(s) if s.code() == code && want.iter().all(|w| s.message().contains(w)) => continue,
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        eprintln!("{what}: want {code:?} naming {want:?}, got {outcome}");
        wrong.push(what);
    }
    assert!(wrong.is_empty(), "wrong answers: {wrong:?}");
    assert_eq!(
        list_files(&staging),
        before,
        "nothing staged by refused batches"
    );
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_definitions_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), vec![], 1).await;
    let mut admin = c.admin_client().await;
    let req = |pk: Vec<&str>, parts: Vec<&str>, schema: &str| {
        freshet_proto::admin::v1::CreateTableRequest {
            name: "x".into(),
            uri: dir.path().join("x").display().to_string(),
            schema_json: schema.into(),
            primary_key: pk.into_iter().map(String::from).collect(),
            partition_by: parts.into_iter().map(String::from).collect(),
            target_file_size: 0,
            merge_mode: Default::default(),
        }
    };
    let schema = r#"{"fields":[{"name":"id","type":"int64"},{"name":"region","type":"string"}]}"#;
    let e = admin
        .create_table(req(vec!["id"], vec!["region"], schema))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("partition column 'region' is not part of the primary key"),
        "{}",
        e.message()
    );
    let e = admin
        .create_table(req(
            vec!["id"],
            vec![],
            r#"{"fields":[{"name":"id","type":"int128"}]}"#,
        ))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("unknown column type 'int128'"),
        "{}",
        e.message()
    );
    // Created once; adopting with another schema is refused, with the same schema accepted.
    admin
        .create_table(req(vec!["id"], vec![], schema))
        .await
        .unwrap();
    c.stop();
    let c = Cluster::start(dir.path(), vec![], 1).await;
    let mut admin = c.admin_client().await;
    let other = r#"{"fields":[{"name":"id","type":"int64"},{"name":"region","type":"int32"}]}"#;
    let mut r = req(vec!["id"], vec![], other);
    r.name = "y".into();
    let e = admin.create_table(r).await.unwrap_err();
    assert!(
        e.message().contains("cannot be adopted") && e.message().contains("column 'region'"),
        "{}",
        e.message()
    );
    let mut r = req(vec!["id"], vec![], schema);
    r.name = "z".into();
    assert!(admin.create_table(r).await.unwrap().into_inner().adopted);
    c.stop();
}
