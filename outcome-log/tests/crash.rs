//! Crash safety of the crate: a child process writes rows as fast as it can and is killed with
//! SIGKILL at random moments, 20 times, on the same file. After each kill the log must pass
//! `PRAGMA integrity_check`, hold every row the child had acknowledged, field for field, and
//! hold each dialogue's turns without holes (rows commit in order, whole or not at all).

#[path = "support/load_rows.rs"]
mod load_rows;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use outcome_log::{OutcomeLog, OutcomeLogConfig, WriterConfig};
use rand::{Rng, SeedableRng};

const KILLS: usize = 20;
const THREADS: u32 = 4;

/// The load generator example, built by `cargo test` next to the test binaries.
fn load_generator() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug_dir = exe.parent().and_then(|deps| deps.parent()).expect("target profile directory");
    let path = debug_dir.join("examples").join("outcome_writer_load");
    assert!(path.exists(), "{} is missing: run through `cargo test`, which builds examples", path.display());
    path
}

/// An acknowledgement line: dialogue, turn, row id.
fn parse_ack(line: &str) -> Option<(String, u32, i64)> {
    let mut parts = line.strip_prefix("acked ")?.split(' ');
    let dialogue = parts.next()?.to_owned();
    let turn = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    Some((dialogue, turn, id))
}

#[test]
fn crash_kill9_twenty_times_keeps_every_acknowledged_row() {
    let generator = load_generator();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outcomes.db");
    let seed: u64 = rand::random();
    eprintln!("kill timing seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acked: HashMap<(String, u32), i64> = HashMap::new();
    let mut rows_before = 0usize;
    for run in 0..KILLS {
        let mut child = Command::new(&generator)
            .arg(&db)
            .arg(format!("run{run}"))
            .arg(THREADS.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut lines = Vec::new();
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    // A line cut by the kill has no newline: not an acknowledgement.
                    Ok(_) if !line.ends_with(b"\n") => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                        if text != "ready" {
                            // The first acknowledgement: the load is on, the kill may come.
                            if lines.is_empty() {
                                let _ = ready_tx.send(());
                            }
                            lines.push(text);
                        }
                    }
                }
            }
            lines
        });
        ready_rx.recv_timeout(Duration::from_secs(60)).expect("the load generator acknowledged nothing");
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!(status.signal(), Some(9), "run {run}: the child ended on its own: {status:?}\n{stderr}");
        assert!(stderr.is_empty(), "run {run}: the child reported errors:\n{stderr}");
        let lines = reader.join().unwrap();
        let mut acked_now = 0usize;
        for line in &lines {
            let (dialogue, turn, id) =
                parse_ack(line).unwrap_or_else(|| panic!("run {run}: odd line {line:?}"));
            assert!(acked.insert((dialogue, turn), id).is_none(), "run {run}: {line} acknowledged twice");
            acked_now += 1;
        }
        assert!(acked_now > 0, "run {run}: nothing acknowledged before the kill");

        let log = OutcomeLog::open(&db, OutcomeLogConfig::default()).unwrap();
        log.integrity_check().unwrap_or_else(|e| panic!("run {run}: {e}"));
        let rows = log.all_rows().unwrap();
        let stats = log.stats().unwrap();
        assert_eq!(stats.rows as usize, rows.len());
        assert_eq!(stats.pending_upload as usize, rows.len());

        let mut by_key: HashMap<(String, u32), i64> = HashMap::new();
        let mut turns: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for r in &rows {
            let o = &r.outcome;
            assert_eq!(*o, load_rows::row(&o.dialogue_id, o.turn), "run {run}: row {} differs", r.id);
            by_key.insert((o.dialogue_id.clone(), o.turn), r.id.0);
            turns.entry(o.dialogue_id.clone()).or_default().push(o.turn);
        }
        for ((dialogue, turn), id) in &acked {
            assert_eq!(
                by_key.get(&(dialogue.clone(), *turn)),
                Some(id),
                "run {run}: acknowledged {dialogue} {turn} lost"
            );
        }
        for (dialogue, mut t) in turns {
            t.sort_unstable();
            assert!(
                t.iter().enumerate().all(|(i, v)| i as u32 == *v),
                "run {run}: {dialogue} has holes: {t:?}"
            );
        }
        // Rows committed but not yet acknowledged when the kill came: at most what one batch and
        // the queue hold.
        let new_rows = rows.len() - rows_before;
        let unacknowledged = new_rows - acked_now;
        let bound = WriterConfig::default().queue_capacity + WriterConfig::default().max_batch;
        assert!(
            unacknowledged <= bound,
            "run {run}: {unacknowledged} rows committed without an acknowledgement"
        );
        eprintln!(
            "run {run}: {acked_now} acknowledged, {new_rows} committed, {} rows in the log",
            rows.len()
        );
        rows_before = rows.len();
    }
}
