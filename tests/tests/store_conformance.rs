//! The store conformance suite against every store: the embedded redb file, MongoDB on a real
//! FerretDB, and the timing decorator the dispatcher wraps around either; plus the original
//! deployment's data served as it is.
use dispatcher::store::embedded::EmbeddedStore;
use dispatcher::store::mongo::{LegacyBlades, MongoStore};
use dispatcher::store::timed::Timed;
use dispatcher::store::{Method, Store, StoredSecret, conformance};
use std::sync::Arc;
use vncdispatch_tests::ferretdb::FerretDb;

fn legacy() -> LegacyBlades {
    LegacyBlades {
        method: Method::Ssh,
        port: 22,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(&dir.path().join("sessions.redb")).expect("open");
    conformance::run(Arc::new(store), "e-").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timed_store_conforms() {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(&dir.path().join("sessions.redb")).expect("open");
    conformance::run(Arc::new(Timed(Arc::new(store))), "t-").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mongo_store_conforms_on_ferretdb() {
    let db = FerretDb::start().await;
    let store = MongoStore::connect(&db.uri("vncDispatch"), legacy())
        .await
        .expect("connect");
    conformance::run(Arc::new(store), "c-").await;
    // Index creation is idempotent: a second dispatcher connecting is fine.
    MongoStore::connect(&db.uri("vncDispatch"), legacy())
        .await
        .expect("reconnect");
}

#[tokio::test(flavor = "multi_thread")]
async fn original_schema_is_read_without_migration() {
    let db = FerretDb::start().await;
    let client = mongodb::Client::with_uri_str(db.uri("vncDispatch"))
        .await
        .expect("client");
    let raw = client.database("vncDispatch");
    use mongodb::bson::doc;
    raw.collection("config")
        .insert_one(
            doc! { "blade_list": ["blade1", "blade2"], "num_of_blades": 2, "last_blade": 1 },
        )
        .await
        .expect("seed config");
    raw.collection("tokenizer")
        .insert_one(
            doc! { "username": "legacyuser", "password": "pw123456", "token": "cafe".repeat(15),
            "blade": "blade2", "display": 4, "vncpid": 4321, "remoteip": "192.0.2.7" },
        )
        .await
        .expect("seed session");
    let store = MongoStore::connect(&db.uri("vncDispatch"), legacy())
        .await
        .expect("connect");
    let blades = store.list_blades().await.expect("blades");
    assert_eq!(
        blades.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ["blade1", "blade2"]
    );
    assert_eq!(
        (blades[0].host.as_str(), blades[0].method, blades[0].port),
        ("blade1", Method::Ssh, 22)
    );
    assert_eq!(
        store.next_round_robin().await.expect("rr"),
        2,
        "continues the original counter"
    );
    let rec = store
        .find_by_token("no-hash-yet", &"cafe".repeat(15))
        .await
        .expect("find")
        .expect("legacy row found");
    assert_eq!(
        (rec.username.as_str(), rec.display, rec.port, rec.vnc_pid),
        ("legacyuser", 4, 5904, 4321)
    );
    assert_eq!(rec.password, StoredSecret::Plain("pw123456".into()));
    // Touching it records the hash, after which it is found by hash.
    store
        .touch("legacyuser", "newhash", "198.51.100.1", i64::MAX, i64::MAX)
        .await
        .expect("touch")
        .expect("touched");
    assert!(
        store
            .find_by_token("newhash", "")
            .await
            .expect("find")
            .is_some()
    );
    // Our blade admin keeps the original fields in step.
    store.set_draining("blade1", true).await.expect("drain");
    let config = raw
        .collection::<mongodb::bson::Document>("config")
        .find_one(doc! {})
        .await
        .expect("read")
        .expect("doc");
    assert_eq!(config.get_i32("num_of_blades").ok(), Some(2));
    assert_eq!(
        config.get_array("blade_list").map(|a| a.len()).ok(),
        Some(2)
    );
}
