//! S3 mode: Parquet data in an S3-compatible bucket (a local `moto[server]` on a free loopback port, from
//! `scripts/lake-deps --python`), catalog in a local file. Write, flush, read back, see the objects in the
//! bucket with boto3, maintain (merged objects replace the small ones, the replaced ones are deleted), and
//! read it through the CLI with the `[lake.s3]` section of a budgets.toml.

mod common;
#[path = "common/lake.rs"]
mod lake_common;

use lake_common::{budgets_toml, file_config, lake_toml, month_start, pgbudget, pool_row, python, require_python};
use pgbudget::lake::config::S3Config;
use pgbudget::lake::{maintain, tables, Lake, LakeConfig, Registry, Value};
use serde_json::{json, Value as Json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUCKET: &str = "pgbudget-lake-test";

/// `python3 -m moto.server` on a free port, stopped by PID on drop.
struct Moto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Moto {
    fn start() -> Moto {
        let port = common::free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3 -m moto.server starts");
        let m = Moto { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Run boto3 code with `s3` (a client for this server) and `bucket` defined; returns its stdout.
    fn boto3(&self, code: &str) -> String {
        let script = format!(
            "import boto3, json, sys\n\
             s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='testing',\n\
                               aws_secret_access_key='testing', region_name='us-east-1')\n\
             bucket = sys.argv[2]\n{code}"
        );
        python(&script, &[&self.url(), BUCKET])
    }

    /// Every object under `prefix`: (key, size, first 4 bytes).
    fn objects(&self, prefix: &str) -> Vec<(String, u64, String)> {
        let out = self.boto3(&format!(
            "keys = []\n\
             for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix={prefix:?}):\n\
             \x20   for o in page.get('Contents', []):\n\
             \x20       head = s3.get_object(Bucket=bucket, Key=o['Key'], Range='bytes=0-3')['Body'].read()\n\
             \x20       keys.append([o['Key'], o['Size'], head.decode('latin1')])\n\
             print(json.dumps(keys))"
        ));
        let v: Vec<(String, u64, String)> = serde_json::from_str(out.trim()).unwrap();
        v
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_and_sum(lake: &Lake) -> Json {
    let r = lake
        .reader()
        .query("SELECT count(*) AS n, sum(queries) AS q, min(ts) AS first FROM lake.pool_snapshots", &[], 1)
        .unwrap();
    Json::Object(r.rows[0].clone())
}

#[test]
fn s3_data_path_against_moto() {
    require_python("moto, boto3", "scripts/lake-deps --python");
    let started = Instant::now();
    let moto = Moto::start();
    eprintln!("moto up in {:?}", started.elapsed());
    moto.boto3("s3.create_bucket(Bucket=bucket)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig {
        data_path: format!("s3://{BUCKET}/lake/"),
        s3: Some(S3Config {
            key_id: "testing".into(),
            secret: "testing".into(),
            region: "us-east-1".into(),
            endpoint: format!("127.0.0.1:{}", moto.port),
            url_style: "path".into(),
            use_ssl: false,
            scope: format!("s3://{BUCKET}"),
        }),
        flush_rows: 5000,
        expire_older_than: Duration::ZERO,
        cleanup_older_than: Duration::ZERO,
        ..file_config(dir.path())
    };
    let lake = Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap();
    assert!(lake.is_attached());
    let w = lake.writer().unwrap();
    // Four Parquet batches over two months, and 5 inlined server_errors rows.
    let (jan, feb) = (month_start(2026, 1, 0), month_start(2026, 2, 0));
    for b in 0..4 {
        for i in b * 50..(b + 1) * 50 {
            w.append(tables::POOL_SNAPSHOTS, pool_row(i, if i % 2 == 0 { jan + i } else { feb + i }));
        }
        assert_eq!(w.flush().unwrap().rows_written, 50);
    }
    for i in 0..5 {
        w.append(
            tables::SERVER_ERRORS,
            vec![
                Value::Ts(jan + i),
                "api".into(),
                "rw".into(),
                "primary".into(),
                "server_error".into(),
                "57P01".into(),
                "bye".into(),
            ],
        );
    }
    assert_eq!(w.flush().unwrap().rows_written, 5);
    let written = count_and_sum(&lake);
    assert_eq!(
        written,
        json!({"n": 200, "q": (0..200).map(|i| i * 100).sum::<i64>(), "first": "2026-01-01T00:00:00.000000Z"})
    );

    // The Parquet files are objects in the bucket, partitioned by year and month.
    let before = moto.objects("lake/");
    eprintln!("{} objects after the writes: {:?}", before.len(), before.iter().map(|o| &o.0).collect::<Vec<_>>());
    let parquet: Vec<_> = before.iter().filter(|o| o.0.ends_with(".parquet")).collect();
    assert_eq!(parquet.len(), 8, "4 batches x 2 months: {before:?}");
    assert!(parquet.iter().all(|o| o.1 > 0 && o.2 == "PAR1"), "{before:?}");
    for m in ["year=2026/month=1/", "year=2026/month=2/"] {
        assert_eq!(parquet.iter().filter(|o| o.0.starts_with(&format!("lake/main/pool_snapshots/{m}"))).count(), 4);
    }

    // Maintenance on S3: inlined rows flushed, objects merged, the replaced ones deleted from the bucket.
    let rep = maintain(&lake).unwrap();
    eprintln!("maintenance on S3: {rep}");
    assert_eq!(rep.rows_flushed, 5);
    assert!(rep.files_merged >= 8 && rep.files_cleaned >= 8, "{rep}");
    let after = moto.objects("lake/");
    eprintln!("{} objects after maintenance: {:?}", after.len(), after.iter().map(|o| &o.0).collect::<Vec<_>>());
    let merged: Vec<_> = after.iter().filter(|o| o.0.starts_with("lake/main/pool_snapshots/")).collect();
    assert_eq!(merged.len(), 2, "one object per month: {after:?}");
    assert!(after.iter().any(|o| o.0.starts_with("lake/main/server_errors/year=2026/month=1/")), "{after:?}");
    assert_eq!(count_and_sum(&lake), written);
    lake.shutdown();
    drop(lake);

    // The CLI reads the same lake from a budgets.toml with a [lake.s3] section.
    let path = dir.path().join("budgets.toml");
    std::fs::write(&path, budgets_toml(&lake_toml(&cfg))).unwrap();
    let (code, out, err) = pgbudget(&[
        "lake",
        "query",
        "select count(*) as n, sum(queries) as q from lake.pool_snapshots",
        "--json",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{{\"n\":200,\"q\":{}}}\n", (0..200).map(|i| i * 100).sum::<i64>()));
    eprintln!("S3 test took {:?}", started.elapsed());
}
