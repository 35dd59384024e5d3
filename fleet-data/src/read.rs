//! Reading the dataset with the DataFusion engine, from a local directory or an S3-compatible
//! object store.
//!
//! [`OutcomeStore::open`] lists the dataset's files (`day=*/*.parquet`; temporary files are
//! skipped), reads each one's footer, and sets aside and reports the files that are not whole
//! Parquet files of the dataset's schema (torn or foreign). The files it kept are one table,
//! `outcome_versions` (every received version of every row, plus the column `day`), and the
//! view `outcomes` keeps the **latest version** of each row, identified by (device, dialogue,
//! turn): the highest-ranked score source (feedback over judge over the refusal heuristic over
//! none), then the latest receipt.
//!
//! Every version of a row lies in the row's own day (the day of its `created_at_ms`, which a
//! resent row keeps), so our own readers find the latest versions **day by day**
//! ([`OutcomeStore::select_day`], the views `day_versions` and `day_outcomes`): a query holds
//! one day's keys, under a memory limit beyond which its sorts spill to disk. The view
//! `outcomes` over the whole dataset is there for ad-hoc SQL on datasets that fit the limit
//! (on 10 million rows, 1 GiB does not hold its sort).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::Schema;
use datafusion::catalog::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::parquet::arrow::parquet_to_arrow_schema;
use datafusion::parquet::file::metadata::ParquetMetaDataReader;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use outcome_log::dataset::DatasetRecord;
use tracing::warn;
use url::Url;

use crate::schema::{file_schema, records_from_batch};
use crate::writer::FILE_SUFFIX;
use crate::{DataError, LatestRecords, TornFile, io_error};

/// Memory the engine may hold before sorts spill to disk, by default.
pub const DEFAULT_MEMORY_LIMIT: usize = 1 << 30;

/// The rank of a version's score source, in SQL: the latest version is the highest rank, then
/// the latest receipt.
const SCORE_RANK: &str = "CASE score_source WHEN 'feedback' THEN 3 WHEN 'judge' THEN 2 \
                          WHEN 'refusal_heuristic' THEN 1 ELSE 0 END";

/// Where the dataset is: a local directory, or `s3://bucket/prefix` (credentials, region and
/// endpoint from the usual `AWS_*` variables; `AWS_ENDPOINT` for S3-compatible stores such as
/// MinIO, with `AWS_ALLOW_HTTP=true` for plain HTTP).
#[derive(Debug, Clone)]
struct Location {
    /// The store's root URL (`file:///` or `s3://bucket`).
    root: Url,
    store: Arc<dyn ObjectStore>,
    /// The dataset's prefix in the store.
    prefix: StorePath,
}

impl Location {
    fn parse(location: &str) -> Result<Self, DataError> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(DataError::Location(format!("{location:?} names no bucket")));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| DataError::Location(format!("{location}: {e}")))?;
            let root =
                Url::parse(&format!("s3://{bucket}")).map_err(|e| DataError::Location(e.to_string()))?;
            return Ok(Self {
                root,
                store: Arc::new(store),
                prefix: StorePath::from(prefix.trim_end_matches('/')),
            });
        }
        if location.contains("://") && !location.starts_with("file://") {
            return Err(DataError::Location(format!(
                "{location:?}: a dataset is a local directory or an s3:// URL"
            )));
        }
        let path = std::path::Path::new(location.strip_prefix("file://").unwrap_or(location));
        let meta = std::fs::metadata(path).map_err(io_error("opening the dataset", path))?;
        if !meta.is_dir() {
            return Err(DataError::NotADirectory(path.to_owned()));
        }
        let absolute = std::fs::canonicalize(path).map_err(io_error("resolving", path))?;
        let prefix =
            StorePath::from_absolute_path(&absolute).map_err(|e| DataError::Location(e.to_string()))?;
        let root = Url::parse("file:///").map_err(|e| DataError::Location(e.to_string()))?;
        Ok(Self { root, store: Arc::new(object_store::local::LocalFileSystem::new()), prefix })
    }

    fn url_of(&self, path: &StorePath) -> String {
        format!("{}/{path}", self.root.as_str().trim_end_matches('/'))
    }
}

/// The day of a data file, `relative` being its path in the dataset:
/// `day=YYYY-MM-DD/<name>.parquet`, not hidden. Anything else is not data.
fn data_file_day(relative: &[&str]) -> Option<String> {
    match relative {
        [day, name] if name.ends_with(FILE_SUFFIX) && !name.starts_with('.') => {
            day.strip_prefix("day=").filter(|d| outcome_log::dataset::is_day_name(d)).map(str::to_owned)
        }
        _ => None,
    }
}

/// The dataset, open for queries.
pub struct OutcomeStore {
    ctx: SessionContext,
    files: usize,
    bytes: u64,
    torn: Vec<TornFile>,
    /// The data files' URLs by day.
    days: BTreeMap<String, Vec<String>>,
}

impl std::fmt::Debug for OutcomeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeStore")
            .field("session", &self.ctx.session_id())
            .field("files", &self.files)
            .field("bytes", &self.bytes)
            .field("torn", &self.torn)
            .finish()
    }
}

impl OutcomeStore {
    /// Opens the dataset at `location` with the default memory limit.
    pub async fn open(location: &str) -> Result<Self, DataError> {
        Self::open_with(location, DEFAULT_MEMORY_LIMIT).await
    }

    /// Opens the dataset at `location`; queries hold at most `memory_limit` bytes and spill
    /// sorts to the system's temporary directory beyond it.
    pub async fn open_with(location: &str, memory_limit: usize) -> Result<Self, DataError> {
        let location = Location::parse(location)?;
        let runtime = RuntimeEnvBuilder::new().with_memory_limit(memory_limit, 1.0).build_arc()?;
        let mut config = SessionConfig::new().with_information_schema(false);
        // Plain strings: what the rows and every client expect.
        config.options_mut().execution.parquet.schema_force_view_types = false;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_object_store(&location.root, location.store.clone());

        let (good, torn, bytes) = list_files(&location).await?;
        for t in &torn {
            warn!(file = %t.path, reason = %t.reason, "dataset file set aside");
        }
        let mut days: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (day, path) in &good {
            days.entry(day.clone()).or_default().push(location.url_of(path));
        }
        let store = Self { ctx, files: good.len(), bytes, torn, days };
        let every_file: Vec<String> = store.days.values().flatten().cloned().collect();
        store.register_files("outcome_files", &every_file)?;
        store.register_views("outcome_files", "outcome_versions", "outcomes").await?;
        Ok(store)
    }

    /// Registers the table `name` over `urls` (an empty table without any).
    fn register_files(&self, name: &str, urls: &[String]) -> Result<(), DataError> {
        let table: Arc<dyn datafusion::catalog::TableProvider> = if urls.is_empty() {
            Arc::new(MemTable::try_new(file_schema(), vec![vec![]])?)
        } else {
            let urls = urls.iter().map(ListingTableUrl::parse).collect::<Result<Vec<_>, _>>()?;
            let options =
                ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(FILE_SUFFIX);
            let config = ListingTableConfig::new_with_multi_paths(urls)
                .with_listing_options(options)
                .with_schema(file_schema());
            Arc::new(ListingTable::try_new(config)?)
        };
        self.ctx.deregister_table(name)?;
        self.ctx.register_table(name, table)?;
        Ok(())
    }

    /// The views over the table `files`: every version with its `day`, and the latest versions.
    async fn register_views(&self, files: &str, versions: &str, latest: &str) -> Result<(), DataError> {
        self.execute_ddl(&format!(
            "CREATE OR REPLACE VIEW {versions} AS SELECT *, \
             to_char(to_timestamp_millis(created_at_ms), '%Y-%m-%d') AS day FROM {files}"
        ))
        .await?;
        self.execute_ddl(&format!(
            "CREATE OR REPLACE VIEW {latest} AS SELECT * EXCLUDE (version_rank) FROM (\
               SELECT *, row_number() OVER (PARTITION BY device_id, dialogue_id, turn \
                 ORDER BY {SCORE_RANK} DESC, received_unix_ms DESC) AS version_rank \
               FROM {versions}) \
             WHERE version_rank = 1"
        ))
        .await
    }

    /// The days that hold data files, in order.
    pub fn days(&self) -> impl Iterator<Item = &str> {
        self.days.keys().map(String::as_str)
    }

    /// Each day's data files as local paths (none for an object store).
    pub(crate) fn day_files(&self) -> impl Iterator<Item = (&str, Vec<std::path::PathBuf>)> {
        self.days.iter().map(|(day, urls)| {
            let paths = urls
                .iter()
                .filter_map(|u| Url::parse(u).ok().filter(|u| u.scheme() == "file")?.to_file_path().ok())
                .collect();
            (day.as_str(), paths)
        })
    }

    /// Points the view `day_outcomes` (the latest versions) and `day_versions` at one day's
    /// files. All versions of a row share its day (the day of its `created_at_ms`, which a row
    /// sent again keeps), so the latest version of every row is found day by day, and a query
    /// holds one day's keys, not the dataset's. One day at a time per store: the views are
    /// the session's, so queries of two days at once need two stores.
    pub async fn select_day(&self, day: &str) -> Result<(), DataError> {
        let urls = self.days.get(day).cloned().unwrap_or_default();
        self.register_files("day_files", &urls)?;
        self.register_views("day_files", "day_versions", "day_outcomes").await
    }

    async fn execute_ddl(&self, sql: &str) -> Result<(), DataError> {
        self.ctx.sql(sql).await.map_err(|e| DataError::Engine(format!("{e} (in {sql})")))?;
        Ok(())
    }

    /// Data files read.
    pub fn files(&self) -> usize {
        self.files
    }

    /// Bytes of the data files read.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Files set aside: not whole Parquet files of the dataset's schema.
    pub fn torn_files(&self) -> &[TornFile] {
        &self.torn
    }

    /// The engine's session, with the table `outcome_versions` and the view `outcomes`.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// A query's result as a data frame.
    pub async fn sql(&self, sql: &str) -> Result<DataFrame, DataError> {
        Ok(self.ctx.sql(sql).await?)
    }

    /// A query's result, all of it.
    pub async fn collect(&self, sql: &str) -> Result<Vec<RecordBatch>, DataError> {
        Ok(self.sql(sql).await?.collect().await?)
    }

    /// A query's result as a stream of batches.
    pub async fn stream(&self, sql: &str) -> Result<SendableRecordBatchStream, DataError> {
        Ok(self.sql(sql).await?.execute_stream().await?)
    }

    /// Stored versions (rows of every file).
    pub async fn version_count(&self) -> Result<u64, DataError> {
        count(&self.collect("SELECT count(*) FROM outcome_versions").await?)
    }

    /// Rows (their latest versions), counted day by day.
    pub async fn latest_count(&self) -> Result<u64, DataError> {
        let mut total = 0;
        for day in self.days.keys() {
            self.select_day(day).await?;
            total += count(&self.collect("SELECT count(*) FROM day_outcomes").await?)?;
        }
        Ok(total)
    }

    /// The latest version of every row, day by day, in (day, device, dialogue, turn) order,
    /// one batch at a time.
    pub async fn for_each_latest(
        &self,
        mut on_records: impl FnMut(Vec<DatasetRecord>) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        for day in self.days.keys() {
            self.select_day(day).await?;
            let mut stream =
                self.stream("SELECT * FROM day_outcomes ORDER BY device_id, dialogue_id, turn").await?;
            while let Some(batch) = stream.next().await {
                on_records(records_from_batch(&batch?)?)?;
            }
        }
        Ok(())
    }

    /// The latest version of every row, all in memory, in (device, dialogue, turn) order.
    pub async fn latest_records(&self) -> Result<LatestRecords, DataError> {
        let mut records = Vec::new();
        self.for_each_latest(|mut batch| {
            records.append(&mut batch);
            Ok(())
        })
        .await?;
        // A dialogue may cross midnight (UTC): its turns come from two days.
        records.sort_by(|a, b| {
            (&a.device_id, &a.outcome.dialogue_id, a.outcome.turn).cmp(&(
                &b.device_id,
                &b.outcome.dialogue_id,
                b.outcome.turn,
            ))
        });
        Ok(LatestRecords { records, versions: self.version_count().await?, torn: self.torn.clone() })
    }
}

pub(crate) fn count(batches: &[RecordBatch]) -> Result<u64, DataError> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    batches
        .first()
        .filter(|b| b.num_rows() == 1)
        .map(|b| b.column(0).as_primitive::<Int64Type>().value(0) as u64)
        .ok_or_else(|| DataError::Engine("a count gave no row".into()))
}

/// The dataset's data files that read as Parquet of its schema (with their day), the others
/// with the reason, and the bytes of the good ones.
async fn list_files(
    location: &Location,
) -> Result<(Vec<(String, StorePath)>, Vec<TornFile>, u64), DataError> {
    let mut listing = location.store.list(Some(&location.prefix));
    let mut candidates = Vec::new();
    let prefix_parts = location.prefix.parts().count();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| DataError::Location(format!("listing the dataset: {e}")))?;
        let parts: Vec<String> =
            meta.location.parts().skip(prefix_parts).map(|p| p.as_ref().to_owned()).collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        if let Some(day) = data_file_day(&parts) {
            candidates.push((day, meta));
        }
    }
    candidates.sort_by(|a, b| a.1.location.cmp(&b.1.location));
    let required = file_schema();
    let (mut good, mut torn, mut bytes) = (Vec::new(), Vec::new(), 0);
    for (day, meta) in candidates {
        let verdict = match file_schema_of(&*location.store, &meta).await {
            Ok(schema) => {
                required.fields().iter().find(|f| schema.field_with_name(f.name()).is_err()).map(|missing| {
                    format!("not a file of the outcome dataset: no column {:?}", missing.name())
                })
            }
            Err(reason) => Some(format!("not a whole Parquet file: {reason}")),
        };
        match verdict {
            None => {
                bytes += meta.size;
                good.push((day, meta.location));
            }
            Some(reason) => torn.push(TornFile { path: meta.location.to_string(), reason }),
        }
    }
    Ok((good, torn, bytes))
}

/// The Arrow schema in a Parquet file's footer (the last 8 bytes: the footer's length and the
/// magic `PAR1`), read with two ranged reads.
async fn file_schema_of(store: &dyn ObjectStore, meta: &ObjectMeta) -> Result<Schema, String> {
    const TAIL: u64 = 8;
    if meta.size < 12 {
        return Err(format!("{} bytes is shorter than a Parquet file's header and footer", meta.size));
    }
    let tail =
        store.get_range(&meta.location, meta.size - TAIL..meta.size).await.map_err(|e| e.to_string())?;
    if &tail[4..] != b"PAR1" {
        return Err("no Parquet footer at the end (a write cut short?)".into());
    }
    let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if footer_len + TAIL + 4 > meta.size {
        return Err(format!("its footer claims {footer_len} bytes of a {}-byte file", meta.size));
    }
    let start = meta.size - TAIL - footer_len;
    let footer = store.get_range(&meta.location, start..meta.size - TAIL).await.map_err(|e| e.to_string())?;
    let metadata = ParquetMetaDataReader::decode_metadata(&footer).map_err(|e| e.to_string())?;
    let file = metadata.file_metadata();
    parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata()).map_err(|e| e.to_string())
}
