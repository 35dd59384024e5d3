//! The log itself: one SQLite connection, its schema, and every operation on rows.

use std::path::{Path, PathBuf};

use policy_onnx::schema::{Action, ModalitySet, TaskCategory};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};

use crate::{LoggedOutcome, OutcomeLogError, RowId, ScoreSource, ScoreUpdate, TurnOutcome, now_ms};

/// The schema version this build writes, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 4;

/// `PRAGMA application_id` of outcome logs ("TMOL"), so that another SQLite file is not taken
/// for a log.
pub const APPLICATION_ID: i32 = 0x544D_4F4C;

/// Smallest accepted size bound: a handful of pages for the schema plus room for rows.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;

/// After an eviction the used size is brought down to this share of `max_bytes`, so that eviction
/// runs once per many batches rather than on every one.
const EVICTION_LOW_WATER: f64 = 0.9;

/// Most rows deleted per eviction step before the size is measured again.
const EVICTION_MAX_STEP_ROWS: u64 = 4096;

const CREATE_SCHEMA: &str = "
CREATE TABLE outcomes (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    dialogue_id      TEXT    NOT NULL,
    turn             INTEGER NOT NULL CHECK (turn >= 0),
    question         TEXT    NOT NULL,
    task             TEXT    NOT NULL,
    observation      BLOB    NOT NULL,
    action_index     INTEGER NOT NULL,
    cloud            INTEGER NOT NULL CHECK (cloud IN (0, 1)),
    modalities       INTEGER NOT NULL,
    propensity       REAL    NOT NULL,
    policy_version   TEXT    NOT NULL,
    policy_sha256    TEXT    NOT NULL,
    latency_secs     REAL    NOT NULL,
    energy_joules    REAL,
    cost_usd         REAL    NOT NULL,
    prompt_tokens    INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    answer           TEXT    NOT NULL,
    score            REAL,
    score_source     TEXT CHECK (score_source IN ('feedback', 'refusal_heuristic', 'judge')),
    telemetry        TEXT    NOT NULL,
    route            TEXT,
    cloud_attempt    TEXT,
    created_at_ms    INTEGER NOT NULL,
    uploaded_at_ms   INTEGER,
    upload_refused   TEXT,
    forced           INTEGER NOT NULL DEFAULT 0 CHECK (forced IN (0, 1)),
    UNIQUE (dialogue_id, turn),
    CHECK ((score IS NULL) = (score_source IS NULL))
);
CREATE INDEX outcomes_pending ON outcomes (id) WHERE uploaded_at_ms IS NULL AND upload_refused IS NULL;
CREATE INDEX outcomes_uploaded ON outcomes (id) WHERE uploaded_at_ms IS NOT NULL;
";

const COLUMNS: &str = "id, dialogue_id, turn, question, task, observation, action_index, cloud, modalities, \
    propensity, policy_version, policy_sha256, latency_secs, energy_joules, cost_usd, prompt_tokens, \
    generated_tokens, answer, score, score_source, telemetry, route, created_at_ms, uploaded_at_ms, cloud_attempt, \
    forced";

const INSERT: &str = "INSERT INTO outcomes (dialogue_id, turn, question, task, observation, action_index, \
    cloud, modalities, propensity, policy_version, policy_sha256, latency_secs, energy_joules, cost_usd, \
    prompt_tokens, generated_tokens, answer, score, score_source, telemetry, route, created_at_ms, \
    cloud_attempt, forced) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, \
    ?23, ?24)";

/// Schema changes from each older version to the next (index 0: from 1 to 2).
const MIGRATIONS: &[&str] = &[
    // 2: the cloud request of a turn and what became of it (JSON).
    "ALTER TABLE outcomes ADD COLUMN cloud_attempt TEXT;",
    // 3: rows a collector refused for good, with its reason: neither pending nor uploaded.
    "ALTER TABLE outcomes ADD COLUMN upload_refused TEXT;
     DROP INDEX outcomes_pending;
     CREATE INDEX outcomes_pending ON outcomes (id) WHERE uploaded_at_ms IS NULL AND upload_refused IS NULL;",
    // 4: turns whose route the app forced (kept out of off-policy estimates and training).
    "ALTER TABLE outcomes ADD COLUMN forced INTEGER NOT NULL DEFAULT 0 CHECK (forced IN (0, 1));",
];

/// How much a commit must survive before it is acknowledged.
///
/// The log runs in WAL mode. A commit appends the transaction's pages to the `-wal` file:
/// - [`Durability::PowerLoss`] (`synchronous = FULL`, the default): the WAL is fsynced at every
///   commit, before the acknowledgement. An acknowledged row survives kill -9, a kernel panic and
///   a power cut. Group commit makes this affordable: one fsync covers every row queued meanwhile.
/// - [`Durability::ProcessCrash`] (`synchronous = NORMAL`): the WAL is fsynced only at
///   checkpoints. An acknowledged row survives kill -9 of the process (its pages are in the
///   kernel's page cache), but a power cut or kernel crash can roll back the last commits since
///   the previous checkpoint. The file is never corrupted in either mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    #[default]
    PowerLoss,
    ProcessCrash,
}

/// How the log is opened.
#[derive(Debug, Clone, PartialEq)]
pub struct OutcomeLogConfig {
    /// Bound on the pages the rows use in the database file (page count minus free pages, times
    /// the page size). The `-wal` file comes on top: it is checkpointed every 1000 pages (about
    /// 4 MiB) and truncated to `wal_limit_bytes` afterwards.
    pub max_bytes: u64,
    /// Size the `-wal` file is truncated to after a checkpoint.
    pub wal_limit_bytes: u64,
    pub durability: Durability,
    /// Run `PRAGMA integrity_check` on open and refuse a damaged file.
    pub check_integrity_on_open: bool,
}

impl Default for OutcomeLogConfig {
    /// 256 MiB, power-loss durability, no check on open.
    fn default() -> Self {
        OutcomeLogConfig {
            max_bytes: 256 * 1024 * 1024,
            wal_limit_bytes: 4 * 1024 * 1024,
            durability: Durability::PowerLoss,
            check_integrity_on_open: false,
        }
    }
}

/// Counts for `/v1/status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LogStats {
    pub rows: u64,
    pub pending_upload: u64,
    pub uploaded: u64,
    /// Rows a collector refused for good (see [`OutcomeLog::mark_upload_refused`]): kept, not
    /// sent again, not evicted as uploaded.
    pub upload_refused: u64,
    /// Bytes the rows use inside the database file (what `max_bytes` bounds).
    pub used_bytes: u64,
    /// Size of the database file plus its `-wal` file on disk.
    pub file_bytes: u64,
    pub max_bytes: u64,
    /// Creation time of the oldest row still waiting for upload.
    pub oldest_pending_ms: Option<i64>,
    /// Uploaded rows evicted since this process opened the log.
    pub evicted_rows: u64,
    /// Rows refused with [`OutcomeLogError::LogFull`] since this process opened the log.
    pub refused_rows: u64,
}

/// The durable outcome log: one SQLite connection. Single-threaded; for concurrent writers use
/// [`crate::OutcomeWriter`], which owns an `OutcomeLog` on its own thread.
///
/// Size bound: when a new row would take the used size past `max_bytes`, the oldest rows
/// *already uploaded* are deleted (oldest first, by row id) until the used size is under 90% of
/// the bound. When every row still waits for upload and the bound is reached, the new row is
/// refused with [`OutcomeLogError::LogFull`] and counted in [`LogStats::refused_rows`]:
/// an acknowledged row is never deleted before the collector has it. This is what a fleet
/// manager wants: a loss is visible where it happens (the daemon logs and counts the refusal,
/// the user still gets the answer), dialogues already logged stay whole from their first turn
/// (evicting the oldest pending rows would cut dialogues off at the start, making their
/// histories unrecoverable for training), and the upload drains in order once the broker is back.
#[derive(Debug)]
pub struct OutcomeLog {
    conn: Connection,
    path: PathBuf,
    config: OutcomeLogConfig,
    page_size: u64,
    evicted_rows: u64,
    refused_rows: u64,
}

impl OutcomeLog {
    /// Opens the log at `path`, creating it (and its schema) when missing.
    pub fn open(path: impl AsRef<Path>, config: OutcomeLogConfig) -> Result<Self, OutcomeLogError> {
        let path = path.as_ref().to_path_buf();
        if config.max_bytes < MIN_MAX_BYTES {
            return Err(OutcomeLogError::InvalidConfig(format!(
                "max_bytes {} is under the minimum of {MIN_MAX_BYTES}",
                config.max_bytes
            )));
        }
        let conn =
            Connection::open(&path).map_err(|source| OutcomeLogError::Open { path: path.clone(), source })?;
        let mut log = OutcomeLog::from_connection(conn, path, config)?;
        log.set_up()?;
        Ok(log)
    }

    /// Opens an existing log read-only (for exports and inspection while tmod runs).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, OutcomeLogError> {
        let path = path.as_ref().to_path_buf();
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags)
            .map_err(|source| OutcomeLogError::Open { path: path.clone(), source })?;
        let log = OutcomeLog::from_connection(conn, path, OutcomeLogConfig::default())?;
        match log.identify()? {
            FileState::Empty => Err(log.not_a_log("the file holds no outcome log schema".into())),
            FileState::Log => Ok(log),
        }
    }

    fn from_connection(
        conn: Connection,
        path: PathBuf,
        config: OutcomeLogConfig,
    ) -> Result<Self, OutcomeLogError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(OutcomeLog { conn, path, config, page_size: 4096, evicted_rows: 0, refused_rows: 0 })
    }

    fn not_a_log(&self, reason: String) -> OutcomeLogError {
        OutcomeLogError::NotAnOutcomeLog { path: self.path.clone(), reason }
    }

    /// Reads the file's identity and schema version.
    fn identify(&self) -> Result<FileState, OutcomeLogError> {
        let application_id: i32 = match self.conn.pragma_query_value(None, "application_id", |r| r.get(0)) {
            Ok(id) => id,
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) => {
                return Err(self.not_a_log(format!("not a SQLite database ({e})")));
            }
            Err(e) => return Err(e.into()),
        };
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tables: i64 = self.conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
        if application_id == 0 && version == 0 && tables == 0 {
            return Ok(FileState::Empty);
        }
        if application_id != APPLICATION_ID {
            return Err(self.not_a_log(format!(
                "application id {application_id:#x}, an outcome log has {APPLICATION_ID:#x}"
            )));
        }
        if version > SCHEMA_VERSION {
            return Err(OutcomeLogError::NewerSchema {
                path: self.path.clone(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            return Err(self.not_a_log(format!("schema version {version} is unknown")));
        }
        Ok(FileState::Log)
    }

    fn set_up(&mut self) -> Result<(), OutcomeLogError> {
        let state = self.identify()?;
        let mode: String = self.conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OutcomeLogError::Open {
                path: self.path.clone(),
                source: rusqlite::Error::InvalidParameterName(format!("journal mode {mode} instead of WAL")),
            });
        }
        let synchronous = match self.config.durability {
            Durability::PowerLoss => "FULL",
            Durability::ProcessCrash => "NORMAL",
        };
        self.conn.pragma_update(None, "synchronous", synchronous)?;
        self.conn.pragma_update(None, "journal_size_limit", self.config.wal_limit_bytes as i64)?;
        if state == FileState::Empty {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(CREATE_SCHEMA)?;
            tx.pragma_update(None, "application_id", APPLICATION_ID)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        } else {
            self.migrate()?;
        }
        self.page_size = self.conn.pragma_query_value(None, "page_size", |r| r.get::<_, i64>(0))? as u64;
        if self.config.check_integrity_on_open {
            self.integrity_check()?;
        }
        Ok(())
    }

    /// Brings a log written by an older build to [`SCHEMA_VERSION`], in one transaction.
    fn migrate(&mut self) -> Result<(), OutcomeLogError> {
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version >= SCHEMA_VERSION {
            return Ok(());
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        for step in &MIGRATIONS[(version - 1) as usize..] {
            tx.execute_batch(step)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        tracing::info!(path = %self.path.display(), from = version, to = SCHEMA_VERSION, "outcome log migrated");
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &OutcomeLogConfig {
        &self.config
    }

    /// Runs `PRAGMA integrity_check`; [`OutcomeLogError::Corrupt`] lists the problems found.
    pub fn integrity_check(&self) -> Result<(), OutcomeLogError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let problems: Vec<String> =
            stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
        if problems.len() == 1 && problems[0] == "ok" {
            Ok(())
        } else {
            Err(OutcomeLogError::Corrupt { problems })
        }
    }

    /// Appends one row in its own transaction (durable when this returns).
    pub fn append(&mut self, outcome: &TurnOutcome) -> Result<RowId, OutcomeLogError> {
        self.append_batch(std::slice::from_ref(outcome)).pop().unwrap_or(Err(OutcomeLogError::WriterStopped))
    }

    /// Appends rows in one transaction: one fsync for all of them. Each row gets its own result:
    /// a row that is invalid, a duplicate or refused for space fails alone; a failed commit fails
    /// every row, and then none of them is in the log.
    pub fn append_batch(&mut self, outcomes: &[TurnOutcome]) -> Vec<Result<RowId, OutcomeLogError>> {
        match self.try_append_batch(outcomes) {
            Ok(results) => results,
            Err(e) => {
                tracing::error!(error = %e, rows = outcomes.len(), "outcome batch not committed");
                outcomes.iter().map(|_| Err(e.for_batch_member())).collect()
            }
        }
    }

    fn try_append_batch(
        &mut self,
        outcomes: &[TurnOutcome],
    ) -> Result<Vec<Result<RowId, OutcomeLogError>>, OutcomeLogError> {
        let max_bytes = self.config.max_bytes;
        let page_size = self.page_size;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut used = used_bytes(&tx, page_size)?;
        let mut evicted = 0u64;
        let mut refused = 0u64;
        let mut evicted_this_batch = false;
        let mut results = Vec::with_capacity(outcomes.len());
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            for outcome in outcomes {
                if let Err(e) = outcome.validate() {
                    results.push(Err(e));
                    continue;
                }
                let estimate = estimated_row_bytes(outcome);
                if used + estimate > max_bytes && !evicted_this_batch {
                    evicted_this_batch = true;
                    let target = (max_bytes as f64 * EVICTION_LOW_WATER) as u64;
                    evicted += evict_uploaded(&tx, page_size, target.saturating_sub(estimate), estimate)?;
                    used = used_bytes(&tx, page_size)?;
                }
                if used + estimate > max_bytes {
                    refused += 1;
                    let pending_rows =
                        tx.query_row("SELECT count(*) FROM outcomes WHERE uploaded_at_ms IS NULL", [], |r| {
                            r.get::<_, i64>(0)
                        })? as u64;
                    results.push(Err(OutcomeLogError::LogFull { used_bytes: used, max_bytes, pending_rows }));
                    continue;
                }
                match insert_row(&mut insert, outcome) {
                    Ok(id) => {
                        used += estimate;
                        results.push(Ok(RowId(id)));
                    }
                    Err(e) if is_unique_violation(&e) => results.push(Err(OutcomeLogError::DuplicateTurn {
                        dialogue: outcome.dialogue_id.clone(),
                        turn: outcome.turn,
                    })),
                    Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) => {
                        // SQLITE_FULL rolls back the whole transaction: nothing of the batch stays.
                        return Err(e.into());
                    }
                    Err(e) => results.push(Err(e.into())),
                }
            }
        }
        tx.commit()?;
        self.evicted_rows += evicted;
        self.refused_rows += refused;
        if evicted > 0 {
            tracing::info!(rows = evicted, max_bytes, "evicted the oldest uploaded outcome rows");
        }
        if refused > 0 {
            tracing::warn!(
                rows = refused,
                max_bytes,
                "outcome log full of rows pending upload: rows refused"
            );
        }
        Ok(results)
    }

    /// A judge's score for a turn answered by the cloud (its `cloud_attempt` says `answered`),
    /// stored as [`OutcomeLog::set_score`] stores a [`ScoreSource::Judge`] score;
    /// [`OutcomeLogError::NotACloudAnswer`] for any other turn.
    pub fn set_judge_score(
        &mut self,
        dialogue: &str,
        turn: u32,
        score: f64,
    ) -> Result<ScoreUpdate, OutcomeLogError> {
        let row = self
            .turn(dialogue, turn)?
            .ok_or_else(|| OutcomeLogError::UnknownTurn { dialogue: dialogue.to_owned(), turn })?;
        if row.outcome.cloud_attempt.as_ref().is_none_or(|a| a.outcome != "answered") {
            return Err(OutcomeLogError::NotACloudAnswer { dialogue: dialogue.to_owned(), turn });
        }
        self.set_score(dialogue, turn, score, ScoreSource::Judge)
    }

    /// Records a turn's score (feedback arrives after the answer). The row becomes pending upload
    /// again so that the collector receives the score (batches are idempotent by dialogue and
    /// turn). A score never replaces one from a higher-ranked source (see [`ScoreSource`]).
    pub fn set_score(
        &mut self,
        dialogue: &str,
        turn: u32,
        score: f64,
        source: ScoreSource,
    ) -> Result<ScoreUpdate, OutcomeLogError> {
        if !score.is_finite() {
            return Err(OutcomeLogError::InvalidOutcome {
                dialogue: dialogue.to_owned(),
                turn,
                reason: format!("score {score} is not finite"),
            });
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(Option<String>, String)> = tx
            .query_row(
                "SELECT score_source, policy_version FROM outcomes WHERE dialogue_id = ?1 AND turn = ?2",
                params![dialogue, turn],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((existing, policy_version)) = existing else {
            return Err(OutcomeLogError::UnknownTurn { dialogue: dialogue.to_owned(), turn });
        };
        if let Some(existing) = existing.as_deref().and_then(|s| s.parse::<ScoreSource>().ok())
            && existing > source
        {
            return Ok(ScoreUpdate::KeptHigherRanked { existing });
        }
        tx.execute(
            "UPDATE outcomes SET score = ?3, score_source = ?4, uploaded_at_ms = NULL, upload_refused = NULL \
             WHERE dialogue_id = ?1 AND turn = ?2",
            params![dialogue, turn, score, source.as_str()],
        )?;
        tx.commit()?;
        Ok(ScoreUpdate::Updated { policy_version })
    }

    /// Up to `limit` rows waiting for upload, oldest first (rows refused by a collector are not).
    pub fn rows_pending_upload(&self, limit: usize) -> Result<Vec<LoggedOutcome>, OutcomeLogError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM outcomes INDEXED BY outcomes_pending \
             WHERE uploaded_at_ms IS NULL AND upload_refused IS NULL ORDER BY id LIMIT ?1"
        );
        self.query_rows(&sql, params![limit as i64])
    }

    /// Marks rows as uploaded (the collector acknowledged them) now; returns how many rows changed
    /// (ids already evicted or already marked are skipped).
    pub fn mark_uploaded(&mut self, ids: &[RowId]) -> Result<usize, OutcomeLogError> {
        let now = now_ms();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut changed = 0;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE outcomes SET uploaded_at_ms = ?2 WHERE id = ?1 AND uploaded_at_ms IS NULL",
            )?;
            for id in ids {
                changed += stmt.execute(params![id.0, now])?;
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Sets rows aside that a collector refused for good, with its reason: they are not
    /// uploaded (so never evicted as such), not pending (so not sent again and again), and
    /// counted in [`LogStats::upload_refused`]. A new score makes a row pending again. Returns
    /// how many rows changed (ids evicted or already uploaded are skipped).
    pub fn mark_upload_refused(&mut self, rows: &[(RowId, String)]) -> Result<usize, OutcomeLogError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut changed = 0;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE outcomes SET upload_refused = ?2 WHERE id = ?1 AND uploaded_at_ms IS NULL",
            )?;
            for (id, reason) in rows {
                changed += stmt.execute(params![id.0, reason])?;
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// The reason a collector gave for refusing a turn's row, if it did.
    pub fn upload_refusal(&self, dialogue: &str, turn: u32) -> Result<Option<String>, OutcomeLogError> {
        Ok(self
            .conn
            .query_row(
                "SELECT upload_refused FROM outcomes WHERE dialogue_id = ?1 AND turn = ?2",
                params![dialogue, turn],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// The row of one turn, if the log holds it.
    pub fn turn(&self, dialogue: &str, turn: u32) -> Result<Option<LoggedOutcome>, OutcomeLogError> {
        let sql = format!("SELECT {COLUMNS} FROM outcomes WHERE dialogue_id = ?1 AND turn = ?2");
        Ok(self.query_rows(&sql, params![dialogue, turn])?.pop())
    }

    /// Every row, oldest first.
    pub fn all_rows(&self) -> Result<Vec<LoggedOutcome>, OutcomeLogError> {
        self.query_rows(&format!("SELECT {COLUMNS} FROM outcomes ORDER BY id"), [])
    }

    fn query_rows(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<LoggedOutcome>, OutcomeLogError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(read_row(row)?);
        }
        Ok(out)
    }

    /// Counts and sizes for `/v1/status`.
    pub fn stats(&self) -> Result<LogStats, OutcomeLogError> {
        let (rows, pending_upload, upload_refused, oldest_pending_ms): (i64, i64, i64, Option<i64>) =
            self.conn.query_row(
                "SELECT (SELECT count(*) FROM outcomes), \
                    (SELECT count(*) FROM outcomes WHERE uploaded_at_ms IS NULL AND upload_refused IS NULL), \
                    (SELECT count(*) FROM outcomes WHERE uploaded_at_ms IS NULL AND upload_refused IS NOT NULL), \
                    (SELECT created_at_ms FROM outcomes INDEXED BY outcomes_pending \
                     WHERE uploaded_at_ms IS NULL AND upload_refused IS NULL ORDER BY id LIMIT 1)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
        let file_len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        Ok(LogStats {
            rows: rows as u64,
            pending_upload: pending_upload as u64,
            uploaded: (rows - pending_upload - upload_refused) as u64,
            upload_refused: upload_refused as u64,
            used_bytes: used_bytes(&self.conn, self.page_size)?,
            file_bytes: file_len(&self.path) + file_len(Path::new(&wal)),
            max_bytes: self.config.max_bytes,
            oldest_pending_ms,
            evicted_rows: self.evicted_rows,
            refused_rows: self.refused_rows,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    Empty,
    Log,
}

/// Bytes of pages holding data: page count minus free pages.
fn used_bytes(conn: &Connection, page_size: u64) -> Result<u64, rusqlite::Error> {
    let (pages, free): (i64, i64) = conn.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count()), (SELECT freelist_count FROM pragma_freelist_count())",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((pages - free).max(0) as u64 * page_size)
}

/// Rough bytes a row takes in the table and its indexes.
fn estimated_row_bytes(o: &TurnOutcome) -> u64 {
    let text = o.dialogue_id.len() * 2
        + o.question.len()
        + o.observation.len() * 4
        + o.policy_version.len()
        + o.policy_sha256.len()
        + o.answer.len()
        + o.route.as_ref().map_or(0, String::len)
        + o.cloud_attempt.as_ref().map_or(0, |_| 200)
        + 128; // numbers, headers, index entries, telemetry beyond its estimate below
    (text + o.telemetry.to_string().len()) as u64
}

/// Deletes the oldest uploaded rows until the used size is at most `target` bytes or no uploaded
/// row is left; returns how many rows went. `row_bytes` sizes each step.
fn evict_uploaded(
    conn: &Connection,
    page_size: u64,
    target: u64,
    row_bytes: u64,
) -> Result<u64, rusqlite::Error> {
    let mut evicted = 0u64;
    loop {
        let used = used_bytes(conn, page_size)?;
        if used <= target {
            break;
        }
        let step = (used - target).div_ceil(row_bytes.max(1)).clamp(1, EVICTION_MAX_STEP_ROWS);
        let deleted = conn.execute(
            "DELETE FROM outcomes WHERE id IN (SELECT id FROM outcomes INDEXED BY outcomes_uploaded \
             WHERE uploaded_at_ms IS NOT NULL ORDER BY id LIMIT ?1)",
            [step as i64],
        )?;
        if deleted == 0 {
            break;
        }
        evicted += deleted as u64;
    }
    Ok(evicted)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

fn insert_row(stmt: &mut rusqlite::CachedStatement<'_>, o: &TurnOutcome) -> Result<i64, rusqlite::Error> {
    let observation: Vec<u8> = o.observation.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (cloud, modalities) = match o.action {
        Action::Local => (0, 0),
        Action::Cloud { modalities } => (1, i64::from(modalities.0)),
    };
    stmt.insert(params![
        o.dialogue_id,
        o.turn,
        o.question,
        o.task.name(),
        observation,
        o.action_index,
        cloud,
        modalities,
        o.propensity,
        o.policy_version,
        o.policy_sha256,
        o.latency_secs,
        o.energy_joules,
        o.cost_usd,
        o.prompt_tokens,
        o.generated_tokens,
        o.answer,
        o.score,
        o.score_source.map(ScoreSource::as_str),
        o.telemetry.to_string(),
        o.route,
        o.created_at_ms,
        o.cloud_attempt.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default()),
        o.forced,
    ])
}

fn read_row(r: &Row<'_>) -> Result<LoggedOutcome, OutcomeLogError> {
    let id: i64 = r.get(0)?;
    let corrupt = |reason: String| OutcomeLogError::CorruptRow { id, reason };
    let task: String = r.get(4)?;
    let task = TaskCategory::from_name(&task).ok_or_else(|| corrupt(format!("unknown task {task:?}")))?;
    let blob: Vec<u8> = r.get(5)?;
    if !blob.len().is_multiple_of(4) {
        return Err(corrupt(format!("observation of {} bytes is not whole f32s", blob.len())));
    }
    let observation =
        blob.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>();
    let cloud: i64 = r.get(7)?;
    let mask: i64 = r.get(8)?;
    let action = match (cloud, u32::try_from(mask)) {
        (0, Ok(0)) => Action::Local,
        (1, Ok(mask)) => Action::Cloud { modalities: ModalitySet(mask) },
        _ => return Err(corrupt(format!("cloud flag {cloud} with modality mask {mask}"))),
    };
    let score_source = match r.get::<_, Option<String>>(19)? {
        None => None,
        Some(s) => Some(s.parse::<ScoreSource>().map_err(corrupt)?),
    };
    let telemetry: String = r.get(20)?;
    let telemetry = serde_json::from_str(&telemetry).map_err(|e| corrupt(format!("telemetry: {e}")))?;
    let cloud_attempt = match r.get::<_, Option<String>>(24)? {
        None => None,
        Some(s) => Some(serde_json::from_str(&s).map_err(|e| corrupt(format!("cloud_attempt: {e}")))?),
    };
    Ok(LoggedOutcome {
        id: RowId(id),
        outcome: TurnOutcome {
            dialogue_id: r.get(1)?,
            turn: r.get(2)?,
            question: r.get(3)?,
            task,
            observation,
            action_index: r.get(6)?,
            action,
            propensity: r.get(9)?,
            policy_version: r.get(10)?,
            policy_sha256: r.get(11)?,
            latency_secs: r.get(12)?,
            energy_joules: r.get(13)?,
            cost_usd: r.get(14)?,
            prompt_tokens: r.get(15)?,
            generated_tokens: r.get(16)?,
            answer: r.get(17)?,
            score: r.get(18)?,
            score_source,
            telemetry,
            route: r.get(21)?,
            cloud_attempt,
            created_at_ms: r.get(22)?,
            text_cut_bytes: 0,
            forced: r.get(25)?,
        },
        uploaded_at_ms: r.get(23)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::tests::sample;

    fn open(dir: &tempfile::TempDir, max_bytes: u64) -> OutcomeLog {
        let config = OutcomeLogConfig { max_bytes, ..OutcomeLogConfig::default() };
        OutcomeLog::open(dir.path().join("outcomes.db"), config).unwrap()
    }

    #[test]
    fn every_field_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = sample("kitchen-1", 0);
        first.score = Some(0.0);
        first.score_source = Some(ScoreSource::RefusalHeuristic);
        first.route = Some("cloud chosen, unavailable, answered locally".into());
        first.energy_joules = None;
        let mut second = sample("kitchen-1", 1);
        second.action = Action::Local;
        second.action_index = 0;
        {
            let mut log = open(&dir, 1 << 20);
            log.integrity_check().unwrap();
            assert_eq!(log.append(&first).unwrap(), RowId(1));
            assert_eq!(log.append(&second).unwrap(), RowId(2));
        }
        let log = open(&dir, 1 << 20);
        let rows = log.all_rows().unwrap();
        assert_eq!(rows.iter().map(|r| &r.outcome).collect::<Vec<_>>(), [&first, &second]);
        assert!(rows.iter().all(|r| r.uploaded_at_ms.is_none()));
        assert_eq!(log.turn("kitchen-1", 1).unwrap().map(|r| r.id), Some(RowId(2)));
        assert_eq!(log.turn("kitchen-1", 2).unwrap(), None);
        let stats = log.stats().unwrap();
        assert_eq!((stats.rows, stats.pending_upload, stats.uploaded), (2, 2, 0));
        assert_eq!(stats.oldest_pending_ms, Some(first.created_at_ms));
        assert!(stats.used_bytes > 0 && stats.file_bytes >= stats.used_bytes, "{stats:?}");
        log.integrity_check().unwrap();
        let read_only = OutcomeLog::open_read_only(dir.path().join("outcomes.db")).unwrap();
        assert_eq!(read_only.all_rows().unwrap().len(), 2);
    }

    #[test]
    fn a_version_1_log_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let old = sample("kitchen-1", 0);
        {
            let mut log = open(&dir, 1 << 20);
            log.append(&old).unwrap();
        }
        // Make it what a version 1 build left behind.
        let path = dir.path().join("outcomes.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP INDEX outcomes_pending; ALTER TABLE outcomes DROP COLUMN upload_refused; \
             ALTER TABLE outcomes DROP COLUMN forced; \
             CREATE INDEX outcomes_pending ON outcomes (id) WHERE uploaded_at_ms IS NULL; \
             ALTER TABLE outcomes DROP COLUMN cloud_attempt; PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);

        let mut log = open(&dir, 1 << 20);
        let mut new = sample("kitchen-1", 1);
        new.cloud_attempt = Some(crate::CloudAttempt {
            outcome: "timeout".into(),
            detail: Some("no reply within 4.0 s".into()),
            wait_secs: 4.0,
            deadline_secs: 4.0,
            request_bytes: 150_000,
            model: None,
            backend_latency_ms: None,
            cost_usd: 0.0,
        });
        log.append(&new).unwrap();
        let rows: Vec<_> = log.all_rows().unwrap().into_iter().map(|r| r.outcome).collect();
        assert_eq!(rows, [old, new]);
        let version: i64 = log.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn refuses_newer_schemas_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(&dir, 1 << 20));
        let path = dir.path().join("outcomes.db");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let err = OutcomeLog::open(&path, OutcomeLogConfig::default()).unwrap_err();
        assert!(
            matches!(err, OutcomeLogError::NewerSchema { found, supported: SCHEMA_VERSION, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
        assert!(err.to_string().contains("newer"), "{err}");

        let other = dir.path().join("other.db");
        Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
        let err = OutcomeLog::open(&other, OutcomeLogConfig::default()).unwrap_err();
        assert!(matches!(err, OutcomeLogError::NotAnOutcomeLog { .. }), "{err}");

        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "x".repeat(4096)).unwrap();
        let err = OutcomeLog::open(&text, OutcomeLogConfig::default()).unwrap_err();
        assert!(matches!(err, OutcomeLogError::NotAnOutcomeLog { .. }), "{err}");

        let err = OutcomeLog::open_read_only(dir.path().join("missing.db")).unwrap_err();
        assert!(matches!(err, OutcomeLogError::Open { .. }), "{err}");
        let small = OutcomeLogConfig { max_bytes: 1000, ..OutcomeLogConfig::default() };
        let err = OutcomeLog::open(dir.path().join("small.db"), small).unwrap_err();
        assert!(matches!(err, OutcomeLogError::InvalidConfig(_)), "{err}");
    }

    #[test]
    fn a_batch_keeps_its_good_rows_when_one_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(&dir, 1 << 20);
        let mut bad = sample("d", 2);
        bad.propensity = 1.5;
        let results = log.append_batch(&[sample("d", 0), sample("d", 0), bad, sample("d", 1)]);
        assert!(matches!(results[0], Ok(RowId(1))));
        assert!(matches!(results[1], Err(OutcomeLogError::DuplicateTurn { turn: 0, .. })), "{results:?}");
        assert!(matches!(results[2], Err(OutcomeLogError::InvalidOutcome { .. })), "{results:?}");
        assert!(results[3].is_ok());
        assert_eq!(log.stats().unwrap().rows, 2);
    }

    #[test]
    fn scores_arrive_later_rank_by_source_and_reupload() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(&dir, 1 << 20);
        let id = log.append(&sample("d", 0)).unwrap();
        assert_eq!(log.mark_uploaded(&[id]).unwrap(), 1);
        assert_eq!(
            log.set_score("d", 0, 0.0, ScoreSource::RefusalHeuristic).unwrap(),
            ScoreUpdate::Updated { policy_version: "2026-11-20.1".into() }
        );
        let row = log.turn("d", 0).unwrap().unwrap();
        assert_eq!(
            (row.outcome.score, row.outcome.score_source),
            (Some(0.0), Some(ScoreSource::RefusalHeuristic))
        );
        assert_eq!(row.uploaded_at_ms, None, "a new score is uploaded again");

        assert_eq!(
            log.set_score("d", 0, 0.9, ScoreSource::Feedback).unwrap(),
            ScoreUpdate::Updated { policy_version: "2026-11-20.1".into() }
        );
        assert_eq!(
            log.set_score("d", 0, 0.1, ScoreSource::Judge).unwrap(),
            ScoreUpdate::KeptHigherRanked { existing: ScoreSource::Feedback }
        );
        assert_eq!(
            log.set_score("d", 0, 0.7, ScoreSource::Feedback).unwrap(),
            ScoreUpdate::Updated { policy_version: "2026-11-20.1".into() }
        );
        let row = log.turn("d", 0).unwrap().unwrap();
        assert_eq!((row.outcome.score, row.outcome.score_source), (Some(0.7), Some(ScoreSource::Feedback)));

        let err = log.set_score("d", 5, 1.0, ScoreSource::Feedback).unwrap_err();
        assert!(matches!(err, OutcomeLogError::UnknownTurn { turn: 5, .. }), "{err}");
        let err = log.set_score("d", 0, f64::NAN, ScoreSource::Feedback).unwrap_err();
        assert!(matches!(err, OutcomeLogError::InvalidOutcome { .. }), "{err}");
    }

    #[test]
    fn upload_drains_in_order_and_marks_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(&dir, 1 << 20);
        let ids: Vec<RowId> = (0..10).map(|t| log.append(&sample("d", t)).unwrap()).collect();
        let batch = log.rows_pending_upload(4).unwrap();
        assert_eq!(batch.iter().map(|r| r.id).collect::<Vec<_>>(), ids[..4]);
        assert_eq!(log.mark_uploaded(&ids[..4]).unwrap(), 4);
        assert_eq!(log.mark_uploaded(&ids[..4]).unwrap(), 0, "already marked");
        assert_eq!(log.mark_uploaded(&[RowId(999)]).unwrap(), 0);
        let next = log.rows_pending_upload(100).unwrap();
        assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), ids[4..]);
        let stats = log.stats().unwrap();
        assert_eq!((stats.rows, stats.pending_upload, stats.uploaded), (10, 6, 4));
        assert_eq!(stats.oldest_pending_ms, Some(sample("d", 4).created_at_ms));
    }

    /// Fills a 256 KiB log, uploads the first rows, then keeps writing: the rows that go are the
    /// oldest uploaded ones, no pending row ever goes, and the used size stays under the bound.
    #[test]
    fn eviction_removes_the_oldest_uploaded_rows_first() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 256 * 1024;
        let mut log = open(&dir, max_bytes);
        let mut ids = Vec::new();
        let mut turn = 0;
        while log.stats().unwrap().used_bytes < max_bytes * 7 / 10 {
            ids.push(log.append(&sample("fill", turn)).unwrap());
            turn += 1;
        }
        // Upload the first half, except row 3, which stays pending.
        let half = ids.len() / 2;
        let uploaded: Vec<RowId> = ids[..half].iter().copied().filter(|id| *id != ids[3]).collect();
        assert_eq!(log.mark_uploaded(&uploaded).unwrap(), uploaded.len());
        let mut new_ids = Vec::new();
        while log.stats().unwrap().evicted_rows == 0 {
            new_ids.push(log.append(&sample("more", turn)).unwrap());
            turn += 1;
            assert!(turn < 10_000, "eviction never started");
        }
        let stats = log.stats().unwrap();
        assert!(stats.used_bytes <= max_bytes, "{stats:?}");
        let present: std::collections::HashSet<RowId> =
            log.all_rows().unwrap().iter().map(|r| r.id).collect();
        let evicted: Vec<RowId> = ids.iter().copied().filter(|id| !present.contains(id)).collect();
        assert_eq!(evicted.len() as u64, stats.evicted_rows);
        assert_eq!(evicted, uploaded[..evicted.len()], "the oldest uploaded rows, in order");
        assert!(present.contains(&ids[3]), "a pending row is never evicted");
        assert!(ids[half..].iter().chain(&new_ids).all(|id| present.contains(id)));
        log.integrity_check().unwrap();
    }

    /// A judge scores cloud answers only: a turn answered locally (or whose cloud request failed
    /// and fell back) keeps its label, whoever publishes on the score topic.
    #[test]
    fn judge_scores_are_stored_for_cloud_answers_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(&dir, 1 << 20);
        let attempt = |outcome: &str| crate::CloudAttempt {
            outcome: outcome.into(),
            detail: None,
            wait_secs: 1.0,
            deadline_secs: 10.0,
            request_bytes: 2000,
            model: None,
            backend_latency_ms: None,
            cost_usd: 0.001,
        };
        log.append(&sample("d", 0)).unwrap();
        log.append(&TurnOutcome { cloud_attempt: Some(attempt("timeout")), ..sample("d", 1) }).unwrap();
        log.append(&TurnOutcome { cloud_attempt: Some(attempt("answered")), ..sample("d", 2) }).unwrap();
        for turn in [0, 1] {
            assert!(matches!(
                log.set_judge_score("d", turn, 0.2),
                Err(OutcomeLogError::NotACloudAnswer { .. })
            ));
            assert_eq!(log.turn("d", turn).unwrap().unwrap().outcome.score, None);
        }
        assert_eq!(
            log.set_judge_score("d", 2, 0.7).unwrap(),
            ScoreUpdate::Updated { policy_version: "2026-11-20.1".into() }
        );
        let row = log.turn("d", 2).unwrap().unwrap().outcome;
        assert_eq!((row.score, row.score_source), (Some(0.7), Some(ScoreSource::Judge)));
        assert!(matches!(log.set_judge_score("d", 9, 0.7), Err(OutcomeLogError::UnknownTurn { .. })));
    }

    /// A row a collector refused is set aside: not pending, not uploaded, never evicted, counted;
    /// a new score makes it pending again.
    #[test]
    fn rows_refused_by_a_collector_are_set_aside_not_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 256 * 1024;
        let mut log = open(&dir, max_bytes);
        let refused = log.append(&sample("d", 0)).unwrap();
        let stored = log.append(&sample("d", 1)).unwrap();
        assert_eq!(log.mark_upload_refused(&[(refused, "propensity 1.5 above 1".into())]).unwrap(), 1);
        assert_eq!(log.mark_uploaded(&[stored]).unwrap(), 1);
        assert!(log.rows_pending_upload(10).unwrap().is_empty());
        let stats = log.stats().unwrap();
        assert_eq!((stats.rows, stats.pending_upload, stats.uploaded, stats.upload_refused), (2, 0, 1, 1));
        assert_eq!(log.upload_refusal("d", 0).unwrap().as_deref(), Some("propensity 1.5 above 1"));
        // Eviction takes uploaded rows only.
        let mut turn = 2;
        while log.stats().unwrap().evicted_rows == 0 {
            let id = log.append(&sample("d", turn)).unwrap();
            log.mark_uploaded(&[id]).unwrap();
            turn += 1;
            assert!(turn < 10_000, "eviction never started");
        }
        assert!(log.turn("d", 1).unwrap().is_none(), "the uploaded row went first");
        assert!(log.turn("d", 0).unwrap().is_some(), "the refused row stays");
        // A new score: the row goes again.
        log.set_score("d", 0, 0.5, ScoreSource::Feedback).unwrap();
        assert_eq!(log.rows_pending_upload(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), [refused]);
        assert_eq!(log.upload_refusal("d", 0).unwrap(), None);
    }

    /// With nothing uploaded, a full log refuses new rows with `LogFull` and keeps every
    /// acknowledged one; after an upload, rows are accepted again.
    #[test]
    fn a_full_log_of_pending_rows_refuses_new_rows() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 128 * 1024;
        let mut log = open(&dir, max_bytes);
        let mut acked = Vec::new();
        let mut turn = 0;
        let err = loop {
            match log.append(&sample("d", turn)) {
                Ok(id) => acked.push(id),
                Err(e) => break e,
            }
            turn += 1;
            assert!(turn < 10_000, "never full");
        };
        let OutcomeLogError::LogFull { used_bytes, max_bytes: bound, pending_rows } = err else {
            panic!("expected LogFull, got {err}");
        };
        assert!(used_bytes <= bound && bound == max_bytes);
        assert_eq!(pending_rows, acked.len() as u64);
        assert!(matches!(log.append(&sample("d", turn)), Err(OutcomeLogError::LogFull { .. })));
        let stats = log.stats().unwrap();
        assert_eq!((stats.rows, stats.refused_rows, stats.evicted_rows), (acked.len() as u64, 2, 0));
        assert!(stats.used_bytes <= max_bytes, "{stats:?}");

        assert_eq!(log.mark_uploaded(&acked[..acked.len() / 2]).unwrap(), acked.len() / 2);
        log.append(&sample("d", turn)).unwrap();
        let stats = log.stats().unwrap();
        assert!(stats.evicted_rows > 0, "{stats:?}");
        assert_eq!(stats.pending_upload as usize, acked.len() - acked.len() / 2 + 1);
        log.integrity_check().unwrap();
    }

    #[test]
    fn process_crash_durability_opens_in_wal_too() {
        let dir = tempfile::tempdir().unwrap();
        let config = OutcomeLogConfig { durability: Durability::ProcessCrash, ..OutcomeLogConfig::default() };
        let mut log = OutcomeLog::open(dir.path().join("o.db"), config).unwrap();
        log.append(&sample("d", 0)).unwrap();
        let mode: String = log.conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        let sync: i64 = log.conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 1));
        let log = open(&dir, 1 << 20);
        let sync: i64 = log.conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "FULL by default");
    }
}
