//! Load generator for the crash test: writes outcome rows as fast as it can from several threads
//! through one `OutcomeWriter`, and prints `acked <dialogue> <turn> <row id>` on stdout (one
//! write per line) after each row is durable. Killed with SIGKILL by `tests/crash.rs`.
//!
//! Usage: outcome_writer_load <db> <run tag> <threads>

#[path = "../tests/support/load_rows.rs"]
mod load_rows;

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use outcome_log::{OutcomeLog, OutcomeLogConfig, OutcomeWriter, WriterConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, db, tag, threads] = args.as_slice() else {
        anyhow::bail!("usage: outcome_writer_load <db> <run tag> <threads>");
    };
    let threads: u32 = threads.parse().context("threads must be a number")?;
    let log = OutcomeLog::open(db, OutcomeLogConfig::default()).with_context(|| format!("opening {db}"))?;
    let writer = Arc::new(OutcomeWriter::spawn(log, WriterConfig::default())?);
    println!("ready");
    std::io::stdout().flush()?;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let writer = Arc::clone(&writer);
            let dialogue = format!("{tag}-{t}");
            std::thread::spawn(move || -> anyhow::Result<()> {
                for turn in 0.. {
                    let dialogue_for_ack = dialogue.clone();
                    writer.append_then(load_rows::row(&dialogue, turn), move |result| match result {
                        Ok(id) => {
                            let line = format!("acked {dialogue_for_ack} {turn} {id}\n");
                            let mut out = std::io::stdout().lock();
                            // The parent reads until the pipe closes; a failed write only means it is gone.
                            let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
                        }
                        Err(e) => eprintln!("row {dialogue_for_ack} {turn} failed: {e}"),
                    })?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(())
}
