//! The drain: records reach the upstream once, in order per key, through
//! the broker; refused ones become dead letters the CLI lists, replays and
//! drops.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// gcsim at 60× (a window is a real second), its writes family enforcing
/// 100 of the documented 300 per window, an unmanaged consumer taking 20.
const SCALE: f64 = 60.0;
const WINDOW_REAL_MS: u64 = 1_000;

#[tokio::test]
async fn records_reach_the_upstream_once_through_the_broker() {
    let dir = TempDir::new("drain");
    let sim = gcsim(sim_config(SCALE, 100, 20)).await;
    let broker = broker(WINDOW_REAL_MS).await;
    let relay = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&format!("http://{}", relay.addr()));
    let n = 300;
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..n {
        let flow = flow.clone();
        posts.spawn(async move {
            // Every record twice, as a data action that timed out retries.
            let a = flow.post(&wrapup(&format!("c{i}"))).await.unwrap();
            let b = flow.post(&wrapup(&format!("c{i}"))).await.unwrap();
            assert_eq!((a.0, b.0), (202, 202));
            assert_eq!(a.1["recordId"], b.1["recordId"]);
        });
    }
    while let Some(r) = posts.join_next().await {
        r.unwrap();
    }
    wait_until(
        "every record delivered",
        Duration::from_secs(60),
        || async { relay.queue().depth().await.unwrap().records == 0 },
    )
    .await;
    let w = writes(&sim).await;
    assert_eq!(w.len(), n, "{w:?}");
    assert!(w.values().all(|&c| c == 1), "written twice: {w:?}");
    let depth = relay.queue().depth().await.unwrap();
    assert_eq!((depth.done, depth.dead), (n as i64, 0));
    // Through the broker: every call leased, no fallback. A hidden limit
    // below the documented one costs 429s while the broker learns: at most
    // what is in flight when the first comes back, twice (the window it
    // learns from and the next); unlearned, it would be hundreds.
    let stats = relay.upstream().stats();
    assert_eq!(stats.ok_2xx, n as u64, "{stats:?}");
    assert_eq!(stats.fallback_leases, 0, "{stats:?}");
    let in_flight = gc_relay::DrainSettings::default().concurrency as u64;
    assert!(stats.throttled_429 <= 2 * in_flight, "{stats:?}");
    relay.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn records_of_one_order_key_go_upstream_in_order() {
    let dir = TempDir::new("order");
    let sim = gcsim(sim_config(SCALE, 300, 0)).await;
    let broker = broker(WINDOW_REAL_MS).await;
    let relay = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&format!("http://{}", relay.addr()));
    // One order key, 20 records (accepted one after the other), delivered
    // 16 at a time if order were not kept.
    for i in 0..20 {
        let mut r = wrapup(&format!("o{i:02}"));
        r["orderKey"] = json!("agent-7");
        assert_eq!(flow.post(&r).await.unwrap().0, 202);
    }
    wait_until(
        "every record delivered",
        Duration::from_secs(30),
        || async { relay.queue().depth().await.unwrap().records == 0 },
    )
    .await;
    let log: Value = reqwest::get(format!("http://{}/_sim/log", sim.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let served: Vec<String> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == 202)
        .filter_map(|e| e["path"].as_str())
        .filter_map(|p| p.split('/').nth(5))
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("o{i:02}")).collect();
    assert_eq!(served, expected);
    relay.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_refused_record_is_a_dead_letter_the_cli_lists_replays_and_drops() {
    let dir = TempDir::new("dlq");
    let sim = gcsim(sim_config(SCALE, 300, 0)).await;
    let broker = broker(WINDOW_REAL_MS).await;
    let relay = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&format!("http://{}", relay.addr()));
    // gcsim answers 400 to a wrap-up without a code.
    let mut bad = wrapup("bad");
    bad["body"] = json!({"code": ""});
    let (_, answer) = flow.post(&bad).await.unwrap();
    let id = answer["recordId"].as_i64().unwrap();
    assert_eq!(flow.post(&wrapup("good")).await.unwrap().0, 202);
    let queue = relay.queue().clone();
    wait_until("a dead letter", Duration::from_secs(30), || async {
        let d = queue.depth().await.unwrap();
        d.dead == 1 && d.records == 0
    })
    .await;

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
            .args(args)
            .args(["--queue", &dir.sqlite()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let list = cli(&["dlq", "list"]);
    let letter: Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    assert_eq!(letter["id"], id);
    assert_eq!(letter["status"], 400);
    assert!(
        letter["answer"]
            .as_str()
            .unwrap()
            .contains("code must not be empty"),
        "{list}"
    );
    assert!(cli(&["status"]).contains("dead letters                  1"));
    // A reader that went away (`gc-relay status | head -1`) is no failure.
    for args in [&["status"][..], &["dlq", "list"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
            .args(args)
            .args(["--queue", &dir.sqlite()])
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.is_empty(), "{args:?}: {err}");
    }

    // Replayed, it is refused again and comes back.
    assert_eq!(
        cli(&["dlq", "replay", &id.to_string()]).trim(),
        "1 dead letter back in the queue"
    );
    wait_until(
        "the replay refused again",
        Duration::from_secs(30),
        || async {
            let calls = relay.upstream().stats().client_4xx;
            calls == 2 && queue.depth().await.unwrap().dead == 1
        },
    )
    .await;
    assert_eq!(
        cli(&["dlq", "drop", "--all"]).trim(),
        "1 dead letter dropped"
    );
    assert_eq!(cli(&["dlq", "list"]), "");
    // An id that is no dead letter (mistyped, already dropped) is an error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
        .args(["dlq", "drop", &id.to_string(), "--queue", &dir.sqlite()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "1 of the 1 ids named is not a dead letter: id {id}; see gc-relay dlq list"
        )),
        "{err}"
    );
    // Its key is still known: a repeat is the same record, not a new one.
    let (status, again) = flow.post(&bad).await.unwrap();
    assert_eq!((status, again["recordId"].as_i64()), (202, Some(id)));
    assert_eq!(queue.depth().await.unwrap().records, 0);
    relay.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

/// A token the upstream no longer knows (it restarted) is answered 401 and
/// the call made again after a new login: a delivery, not a client error
/// (an alert on `client_4xx` fired for each such record).
#[tokio::test]
async fn a_401_for_a_token_the_upstream_forgot_is_a_new_login_not_a_client_error() {
    let dir = TempDir::new("relogin");
    let sim = gcsim(sim_config(SCALE, 300, 0)).await;
    let addr = sim.addr();
    let broker = broker(WINDOW_REAL_MS).await;
    let relay = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&format!("http://{}", relay.addr()));
    let done = |n: i64| {
        let queue = relay.queue().clone();
        move || {
            let queue = queue.clone();
            async move { queue.depth().await.unwrap().done == n }
        }
    };
    assert_eq!(flow.post(&wrapup("before")).await.unwrap().0, 202);
    wait_until(
        "delivered before the restart",
        Duration::from_secs(30),
        done(1),
    )
    .await;
    // The upstream restarts on the same address and forgets its tokens.
    sim.shutdown().await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let sim = gcsim::Sim::start(sim_config(SCALE, 300, 0), listener).unwrap();
    assert_eq!(flow.post(&wrapup("after")).await.unwrap().0, 202);
    wait_until(
        "delivered after the restart",
        Duration::from_secs(30),
        done(2),
    )
    .await;
    assert!(writes(&sim).await.contains_key("after"));
    let status: Value = reqwest::get(format!("http://{}/status", relay.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let up = &status["upstream"];
    assert_eq!(
        (up["client_4xx"].as_u64(), up["retried_4xx"].as_u64()),
        (Some(0), Some(1)),
        "{status}"
    );
    assert_eq!(up["logins"].as_u64(), Some(2), "{status}");
    relay.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

/// A record the upstream refuses for good is said in the relay's log (a
/// warning, at the default level too), with its id and what to do: nothing
/// else tells an operator before someone runs `gc-relay status`.
#[tokio::test]
async fn a_dead_letter_is_logged_with_its_id() {
    let dir = TempDir::new("dlq-log");
    let sim = gcsim(sim_config(SCALE, 300, 0)).await;
    let broker = broker(WINDOW_REAL_MS).await;
    let (relay, mut log) = Child::start_logged(&serve_args(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&relay.url);
    let mut bad = wrapup("bad");
    bad["body"] = json!({"code": ""});
    let (status, answer) = flow.post(&bad).await.unwrap();
    assert_eq!(status, 202);
    let id = answer["recordId"].as_i64().unwrap();
    let said = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("dead letter") {
                return line;
            }
        }
        panic!("gc-relay exited without logging the dead letter");
    })
    .await
    .expect("no dead letter logged within 30 s");
    assert!(
        said.contains("WARN") && said.contains(&format!("id={id}")) && said.contains("status=400"),
        "{said}"
    );
    // The subcommands it names are the CLI's.
    assert!(
        said.contains("gc-relay dlq list")
            && said.contains("dlq replay")
            && said.contains("dlq drop"),
        "{said}"
    );
    relay.kill9().await;
    broker.stop().await;
    sim.shutdown().await;
}

/// Whatever read the relay's log went away (`gc-relay serve | head`, a
/// log shipper restarting): the lines it cannot write are dropped, and it
/// goes on taking records and stops cleanly, never exiting 101 on a
/// panic about a closed stderr.
#[tokio::test]
async fn a_closed_stderr_does_not_take_the_relay_down() {
    let dir = TempDir::new("closed-stderr");
    let sim = gcsim(sim_config(SCALE, 300, 0)).await;
    let broker = broker(WINDOW_REAL_MS).await;
    let mut args = serve_args(&dir.sqlite(), &sim, &broker.url);
    // At info it also logs its stop, on the main thread.
    let level = args.iter().position(|a| a == "--log").unwrap() + 1;
    args[level] = "info".into();
    let (relay, log) = Child::start_logged(&args).await;
    drop(log);
    let flow = Flow::new(&relay.url);
    // A dead letter is logged at WARN: a write to the closed pipe.
    let mut bad = wrapup("bad");
    bad["body"] = json!({"code": ""});
    let (status, _) = flow.post(&bad).await.unwrap();
    assert_eq!(status, 202);
    let status_url = format!("{}/status", relay.url);
    wait_until("the dead letter", Duration::from_secs(30), || {
        let url = status_url.clone();
        async move {
            let s: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            s["upstream"]["client_4xx"].as_u64() >= Some(1)
        }
    })
    .await;
    let (status, _) = flow.post(&wrapup("good")).await.unwrap();
    assert_eq!(status, 202, "the relay still takes records");
    let exit = relay.terminate().await;
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    broker.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_dead_letter_holds_back_the_records_of_its_order_key() {
    let dir = TempDir::new("dlq-order");
    let sim = gcsim(sim_config(SCALE, 300, 0)).await;
    let broker = broker(WINDOW_REAL_MS).await;
    let relay = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&format!("http://{}", relay.addr()));
    // Two records of one order key; the first is refused (no code).
    let mut first = wrapup("first");
    first["body"] = json!({"code": ""});
    first["orderKey"] = json!("agent-7");
    let mut second = wrapup("second");
    second["orderKey"] = json!("agent-7");
    let (_, answer) = flow.post(&first).await.unwrap();
    let id = answer["recordId"].as_i64().unwrap();
    assert_eq!(flow.post(&second).await.unwrap().0, 202);
    let queue = relay.queue().clone();
    wait_until("a dead letter", Duration::from_secs(30), || async {
        queue.depth().await.unwrap().dead == 1
    })
    .await;
    // A record of another key, accepted after both: once it is delivered
    // the drain has claimed past the second, which still waits, unclaimed.
    assert_eq!(flow.post(&wrapup("other")).await.unwrap().0, 202);
    wait_until(
        "the other key's record delivered",
        Duration::from_secs(30),
        || async { queue.depth().await.unwrap().done == 1 },
    )
    .await;
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.records, depth.inflight), (1, 0), "{depth:?}");
    assert!(
        !writes(&sim).await.contains_key("second"),
        "delivered out of order"
    );
    // Where operators look: the dead letter, and the record it holds back.
    let base = format!("http://{}", relay.addr());
    let status: Value = reqwest::get(format!("{base}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let q = &status["queue"];
    assert_eq!(
        (q["dead"].as_i64(), q["blocked"].as_i64()),
        (Some(1), Some(1)),
        "{status}"
    );
    // Its age, taken 90 s after it died.
    let died = queue.dead_letters(1).await.unwrap()[0].dead_ms;
    let later = queue.depth_at(died + 90_000).await.unwrap();
    assert_eq!(later.oldest_dead_age_s, 90.0, "{later:?}");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "gc_relay_dead_letters 1",
        "gc_relay_blocked_records 1",
        "gc_relay_oldest_dead_letter_age_seconds ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(line)),
            "no {line:?} in {metrics}"
        );
    }
    // Dropped, the first no longer holds the key back.
    assert_eq!(queue.drop_dead(Some(&[id])).await.unwrap(), 1);
    wait_until("the second delivered", Duration::from_secs(30), || async {
        writes(&sim).await.contains_key("second")
    })
    .await;
    relay.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

/// `status` and `dlq` on a mistyped queue path say so, and create nothing
/// (they read a queue; they do not start one).
#[test]
fn status_and_dlq_refuse_a_queue_that_does_not_exist() {
    let dir = TempDir::new("typo");
    let typo = dir.0.join("typo.db");
    for args in [&["status"][..], &["dlq", "list"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
            .args(args)
            .arg("--queue")
            .arg(&typo)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("there is no queue at"), "{args:?}: {err}");
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
}

/// `gc-relay` with `args` on the queue at `queue`.
fn cli(args: &[&str], queue: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
        .args(args)
        .arg("--queue")
        .arg(queue)
        .output()
        .unwrap()
}

/// A SQLite queue at `path` made by `schema`, closed again.
async fn sqlite_queue(path: &std::path::Path, schema: &str) {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::raw_sql(schema).execute(&pool).await.unwrap();
    pool.close().await;
}

/// The indexes of the SQLite queue at `path`, by name.
async fn sqlite_indexes(path: &std::path::Path) -> Vec<String> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let names = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' \
         ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    names
}

const RECORDS_TABLE: &str = "CREATE TABLE relay_records (id INTEGER PRIMARY KEY AUTOINCREMENT, \
    idem_key TEXT NOT NULL UNIQUE, order_key TEXT NOT NULL, method TEXT NOT NULL, \
    path TEXT NOT NULL, body TEXT, bytes BIGINT NOT NULL, state TEXT NOT NULL, \
    attempts BIGINT NOT NULL DEFAULT 0, received_ms BIGINT NOT NULL, \
    not_before_ms BIGINT NOT NULL, lease_owner TEXT, lease_until_ms BIGINT, done_ms BIGINT);";

/// `status` and `dlq` on the queue of a relay of the previous release
/// (serving it, maybe) read and settle it as it is: they change no index
/// of it (only `serve` migrates a queue).
#[tokio::test]
async fn status_and_dlq_leave_a_queue_of_the_previous_release_as_it_is() {
    let dir = TempDir::new("previous");
    let path = dir.0.join("queue.db");
    let schema = format!(
        "{RECORDS_TABLE} \
         CREATE INDEX relay_records_state ON relay_records (state, id); \
         CREATE INDEX relay_records_order ON relay_records (order_key, id); \
         CREATE TABLE relay_dead_letters (record_id BIGINT PRIMARY KEY, \
           status BIGINT NOT NULL, answer TEXT NOT NULL, dead_ms BIGINT NOT NULL); \
         INSERT INTO relay_records (idem_key, order_key, method, path, bytes, state, \
           received_ms, not_before_ms) VALUES \
           ('a', 'o', 'POST', '/x', 10, 'dead', 0, 0), ('b', 'o', 'POST', '/x', 10, 'pending', 0, 0); \
         INSERT INTO relay_dead_letters VALUES (1, 400, 'no', 0);"
    );
    sqlite_queue(&path, &schema).await;
    let before = sqlite_indexes(&path).await;
    let status = cli(&["status", "--json"], &path);
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "{err}");
    let depth: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        (depth["records"].as_i64(), depth["dead"].as_i64()),
        (Some(1), Some(1)),
        "{depth}"
    );
    let list = cli(&["dlq", "list"], &path);
    assert!(list.status.success());
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 1);
    let dropped = cli(&["dlq", "drop", "--all"], &path);
    assert!(dropped.status.success());
    assert_eq!(
        String::from_utf8_lossy(&dropped.stdout),
        "1 dead letter dropped\n"
    );
    assert_eq!(sqlite_indexes(&path).await, before);
}

/// A queue without a table `status` and `dlq` read (written by an older
/// relay) is said to be one, exit 1, and left without it.
#[tokio::test]
async fn status_and_dlq_on_a_queue_older_than_they_read_say_so() {
    let dir = TempDir::new("older");
    let path = dir.0.join("queue.db");
    sqlite_queue(&path, RECORDS_TABLE).await;
    for args in [
        &["status"][..],
        &["dlq", "list"],
        &["dlq", "replay", "--all"],
    ] {
        let out = cli(args, &path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("no relay_dead_letters")
                && err.contains("older gc-relay")
                && err.contains("run `gc-relay serve` with this version"),
            "{args:?}: {err}"
        );
    }
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(tables, ["relay_records"]);
}
