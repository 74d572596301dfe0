//! Table lifecycle: `freshet table drop` stops serving a run-time table and forgets it
//! (across restarts), keeps or deletes its data as asked, and refuses what would lose
//! acknowledged changes or fight the configuration file.

use freshet_integration_tests::*;
use freshet_proto::admin::v1::{CreateTableRequest, DropTableRequest, ListTablesRequest};
use tonic::Code;

const SCHEMA: &str = r#"{"fields":[{"name":"id","type":"int64","nullable":false},{"name":"v","type":"string","nullable":true},{"name":"n","type":"int64","nullable":true}]}"#;

fn create(name: &str, uri: &std::path::Path) -> CreateTableRequest {
    CreateTableRequest {
        name: name.into(),
        uri: uri.display().to_string(),
        schema_json: SCHEMA.into(),
        primary_key: vec!["id".into()],
        ..Default::default()
    }
}

fn drop_req(name: &str, delete_data: bool, force: bool) -> DropTableRequest {
    DropTableRequest {
        name: name.into(),
        delete_data,
        force,
    }
}

async fn names(c: &Cluster) -> Vec<String> {
    c.admin_client()
        .await
        .list_tables(ListTablesRequest {})
        .await
        .unwrap()
        .into_inner()
        .tables
        .into_iter()
        .map(|t| t.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_is_forgotten_across_restarts_and_its_data_kept_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "fixed", false, 4096)],
        1,
    )
    .await;
    let mut admin = c.admin_client().await;
    let mut ingest = c.ingest_client().await;
    let (keep, gone) = (dir.path().join("keep"), dir.path().join("gone"));
    admin.create_table(create("keep", &keep)).await.unwrap();
    admin.create_table(create("gone", &gone)).await.unwrap();
    for t in ["keep", "gone"] {
        ingest
            .ingest(request(t, false, &[(1, Some(("a".into(), 1)))]))
            .await
            .unwrap();
    }
    c.coordinator.trigger("keep").await.unwrap();

    // Pending acknowledged changes: refused without force, nothing changed.
    let e = admin
        .drop_table(drop_req("gone", true, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message()
            .contains("1 acknowledged changes are not applied yet"),
        "{}",
        e.message()
    );
    assert!(names(&c).await.contains(&"gone".to_string()));
    assert!(!list_files(&gone).is_empty());
    // A table of the configuration file: refused.
    let e = admin
        .drop_table(drop_req("fixed", false, false))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("configuration file"),
        "{}",
        e.message()
    );
    // Unknown: NOT_FOUND.
    let e = admin
        .drop_table(drop_req("nope", false, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Dropped: keep's data stays, gone's is deleted (force discards its pending change).
    let r = admin
        .drop_table(drop_req("keep", false, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.pending_discarded, r.objects_deleted), (0, 0));
    let r = admin
        .drop_table(drop_req("gone", true, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.pending_discarded, 1);
    assert!(r.objects_deleted > 0);
    assert_eq!(names(&c).await, vec!["fixed".to_string()]);
    assert_eq!(read_table(&keep.display().to_string()).await.len(), 1);
    assert!(list_files(&gone).is_empty(), "{:?}", list_files(&gone));
    let e = ingest
        .ingest(request("keep", false, &[(2, None)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A restarted coordinator does not serve them again; the name can be reused.
    let c = c.restart().await;
    assert_eq!(names(&c).await, vec!["fixed".to_string()]);
    c.admin_client()
        .await
        .create_table(create("keep", &keep))
        .await
        .unwrap();
    assert_eq!(names(&c).await.len(), 2);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_alter_adds_nullable_columns_that_new_batches_fill_and_old_rows_read_as_null() {
    use freshet_proto::admin::v1::AlterTableRequest;
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "fixed", false, 4096)],
        1,
    )
    .await;
    let mut admin = c.admin_client().await;
    let uri = dir.path().join("r");
    admin.create_table(create("r", &uri)).await.unwrap();
    c.ingest_client()
        .await
        .ingest(request("r", false, &[(1, Some(("a".into(), 1)))]))
        .await
        .unwrap();

    // Refused: an existing column, a bad type, a table of the configuration file.
    let alter = |name: &str, json: &str| AlterTableRequest {
        name: name.into(),
        add_columns_json: json.into(),
    };
    let e = admin
        .alter_table(alter("r", r#"{"fields":[{"name":"v","type":"string"}]}"#))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("column 'v' exists already"),
        "{}",
        e.message()
    );
    let e = admin
        .alter_table(alter("r", r#"{"fields":[{"name":"x","type":"wat"}]}"#))
        .await
        .unwrap_err();
    assert!(e.message().contains("wat"), "{}", e.message());
    let e = admin
        .alter_table(alter(
            "fixed",
            r#"{"fields":[{"name":"x","type":"int32"}]}"#,
        ))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("configuration file"),
        "{}",
        e.message()
    );

    // Through the CLI: the pending change goes in first under the old schema.
    let out = std::process::Command::new(freshet_bin())
        .args([
            "--endpoint",
            &c.endpoint,
            "table",
            "alter",
            "r",
            "--add-column",
            "note:string",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = c.coordinator.table("r").unwrap();
    assert!(t.def.schema.field_with_name("note").unwrap().is_nullable());
    let rows = query(
        &uri.display().to_string(),
        "SELECT id, note IS NULL AS n FROM t ORDER BY id",
    )
    .await;
    assert_eq!(rows[0].num_rows(), 1);
    // A restarted coordinator serves the altered table (from the catalog).
    let c = c.restart().await;
    assert!(
        c.coordinator
            .table("r")
            .unwrap()
            .def
            .schema
            .field_with_name("note")
            .is_ok()
    );
    c.stop();
}
