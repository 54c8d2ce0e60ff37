//! The plan cache: the graph `plan` makes from a model file, stored after its rewrites so that
//! the next load of the same model skips reading the ONNX file, tract's decluttering and every
//! weight's repacking (SmolLM2-135M q4: 1.4 s of a 1.5 s load, bench/RESULTS.md).
//!
//! An entry is a directory named by a hash of everything the plan depends on ([`key`]): the
//! model file's identity, its manifest, this binary, the target and the kernel level (weights
//! are laid out for the kernels this CPU runs). It holds the graph in NNEF (`graph/`, the
//! engine's ops through `ops::nnef`), the laid-out weights (`weights.bin`, mapped when read,
//! indexed by `weights.json`), what it was made from (`source.txt`) and a digest of all that
//! but the weights' bulk (`digest.txt`). An entry is written to a temporary directory and
//! renamed into place, so a reader sees a whole entry or none. A new entry replaces the older
//! ones of its model file and kernel level, and the cache keeps at most its budget of bytes,
//! dropping the least recently used entries.
//!
//! The cache is never needed: an entry that cannot be used (unreadable, damaged, edited, made
//! from another model, failing to optimize or to run the template head) is removed and the
//! model loaded from its file, and one that cannot be written (read-only disk, disk full) is
//! skipped, each with a warning that names the directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tract_onnx::prelude::*;
use tract_onnx::WithOnnx;
use tract_transformers::WithTractTransformers;

use crate::engine::ops::isa;
use crate::engine::ops::nnef::{self, WeightIndex, WeightStore};

/// Bumped whenever what an entry holds changes meaning.
const FORMAT: &str = "mulmd plan cache 1";

/// The default budget: room for SmolLM2-135M at float32 (a 630 MB entry) and a few smaller plans.
pub const DEFAULT_MB: u64 = 2048;

/// Where plans are cached, and how many bytes of them are kept; or no cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
}

/// What a load did with the plan cache (`plan_cache` in `mulmd probe`'s JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheUse {
    /// No cache configured.
    Off,
    /// The plan came from the cache.
    Hit,
    /// The plan was made from the model file and stored.
    Stored,
    /// The plan was made from the model file and could not be stored (the log says why).
    Unstored,
}

impl PlanCache {
    /// No cache: every load reads the model file.
    pub fn off() -> Self {
        Self { dir: None, max_bytes: 0 }
    }

    /// Plans kept under `dir`, at most `max_mb` MiB of them (0: none, the same as off).
    pub fn at(dir: PathBuf, max_mb: u64) -> Self {
        match max_mb {
            0 => Self::off(),
            mb => Self { dir: Some(dir), max_bytes: mb.saturating_mul(1 << 20) },
        }
    }

    /// `$MULMD_PLAN_CACHE` (a directory, or `off`), else [`default_dir`], with the default
    /// budget; what the CLI and `mulmd bench` use.
    pub fn from_env() -> Self {
        match std::env::var_os("MULMD_PLAN_CACHE").filter(|v| !v.is_empty()) {
            Some(v) if v == "off" => Self::off(),
            // Relative to where the command runs, made absolute once.
            Some(v) => Self::at(std::env::current_dir().map(|cwd| cwd.join(&v)).unwrap_or_else(|_| PathBuf::from(v)), DEFAULT_MB),
            None => default_dir().map_or_else(Self::off, |d| Self::at(d, DEFAULT_MB)),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The plan stored for `key`, if an entry holds one. A damaged entry is removed.
    pub(crate) fn load(&self, key: &PlanKey) -> Option<TypedModel> {
        let entry = self.dir.as_ref()?.join(&key.name);
        // Whatever is under the entry's name, even not a directory, is read or discarded:
        // something left there would otherwise block storing a good entry for ever.
        std::fs::symlink_metadata(&entry).ok()?;
        // tract's NNEF reader is not built for damaged input: a panic in it is a damaged
        // entry like any other, never a failed load.
        let read = std::panic::catch_unwind(|| read_entry(&entry, &key.source)).unwrap_or_else(|_| Err(anyhow::anyhow!("reading it panicked")));
        match read {
            Ok(model) => {
                // The entry's last use, for the eviction order.
                let _ = std::fs::File::open(entry.join(WEIGHTS_INDEX)).and_then(|f| f.set_modified(SystemTime::now()));
                Some(model)
            }
            Err(e) => {
                self.discard(key, &e);
                None
            }
        }
    }

    /// Removes the entry for `key`, which `problem` makes unusable, with a warning.
    pub(crate) fn discard(&self, key: &PlanKey, problem: &TractError) {
        let Some(root) = &self.dir else { return };
        let entry = root.join(&key.name);
        // Bounded: a parse error may quote a damaged file's line, however long.
        let mut problem = format!("{problem:#}");
        if let Some((cut, _)) = problem.char_indices().nth(400) {
            problem.truncate(cut);
            problem.push('…');
        }
        tracing::warn!(entry = %entry.display(), "the cached plan cannot be used ({problem}); removing it and loading the model file");
        let _ = std::fs::remove_dir_all(&entry).or_else(|_| std::fs::remove_file(&entry));
    }

    /// Removes `dir`'s entry, which `problem` showed to be unusable after it was read.
    pub(crate) fn discard_for(&self, dir: &Path, problem: &TractError) {
        if let Ok(key) = key(dir) {
            self.discard(&key, problem);
        }
    }

    /// Stores `model` under `key`, then drops the other entries of the same model file and
    /// kernel level (made by an older binary or of an older file: never read again) and the
    /// least recently used entries past the budget. Returns whether the entry is in place.
    pub(crate) fn store(&self, key: &PlanKey, model: &TypedModel) -> bool {
        let Some(root) = &self.dir else { return false };
        let entry = root.join(&key.name);
        let key_name = &key.name;
        // Unique to this process and this store: threads may load the same model at once.
        static STORES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temp = root.join(format!(".{key_name}.{}.{n}.partial", std::process::id()));
        let written = std::fs::create_dir_all(root)
            .map_err(TractError::from)
            .and_then(|_| write_entry(&temp, model, &key.source))
            .and_then(|_| match std::fs::rename(&temp, &entry) {
                // Another process stored the same plan first: theirs is as good.
                Err(_) if entry.join(WEIGHTS_INDEX).is_file() => Ok(()),
                other => other.map_err(TractError::from),
            });
        let _ = std::fs::remove_dir_all(&temp);
        if let Err(e) = written {
            tracing::warn!(dir = %root.display(), "cannot store the model's plan in the plan cache ({e:#}); the next load reads the model file again. Make the directory writable, free space, or set [model] plan_cache = \"off\"");
            return false;
        }
        self.evict(&entry, &key.source);
        let kept = entry.is_dir();
        if !kept {
            tracing::warn!(dir = %root.display(), budget_mb = self.max_bytes >> 20, "the model's plan is larger than the plan cache's budget and was not kept; raise [model] plan_cache_mb");
        }
        kept
    }

    /// Removes the entries other than `newest` made from `source`, then the least recently used
    /// ones until the cache fits its budget, `newest` last of all; and partial entries a crashed
    /// writer left over an hour ago.
    fn evict(&self, newest: &Path, source: &str) {
        let Some(root) = &self.dir else { return };
        let Ok(listing) = std::fs::read_dir(root) else { return };
        let mut entries: Vec<(bool, SystemTime, u64, PathBuf)> = Vec::new();
        for item in listing.flatten() {
            let path = item.path();
            let name = item.file_name();
            let used = std::fs::metadata(path.join(WEIGHTS_INDEX)).and_then(|m| m.modified());
            if name.to_string_lossy().ends_with(".partial") {
                let old = item.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if old.is_some_and(|age| age > Duration::from_secs(3600)) {
                    let _ = std::fs::remove_dir_all(&path);
                }
            } else if path != newest && std::fs::read_to_string(path.join(SOURCE)).is_ok_and(|s| s == source) {
                let _ = std::fs::remove_dir_all(&path);
            } else if let Ok(used) = used {
                entries.push((path == newest, used, tree_bytes(&path), path));
            }
        }
        // Oldest first, the newest entry after every other.
        entries.sort_by_key(|(is_newest, used, ..)| (*is_newest, *used));
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        for (_, _, bytes, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_dir_all(&path).is_ok() {
                total -= bytes;
            }
        }
    }
}

/// `$CACHE_DIRECTORY/plans` (systemd's `CacheDirectory=`), else `$XDG_CACHE_HOME/mulmd/plans`,
/// else `~/.cache/mulmd/plans`; none without any of them.
pub fn default_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(systemd) = var("CACHE_DIRECTORY") {
        // systemd joins several directories with ':'; the first is this service's own.
        let first = systemd.to_string_lossy().split(':').next().map(PathBuf::from)?;
        return Some(first.join("plans"));
    }
    let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))?;
    Some(cache.join("mulmd").join("plans"))
}

/// What names an entry.
pub(crate) struct PlanKey {
    /// The entry's directory name: a hash of everything the plan depends on.
    name: String,
    /// The model file and kernel level it is for, kept in the entry: a newer entry for the
    /// same replaces it.
    source: String,
}

/// The key of a model directory's plan: a hash of the format, this binary (its version, size
/// and modification time: a rebuilt engine may lay weights out differently), the target, the
/// kernel level, the model file's identity (path, size, modification time, inode) and the
/// manifest's bytes. Only files' metadata is read, never the weights.
pub(crate) fn key(dir: &Path) -> std::io::Result<PlanKey> {
    use std::os::unix::fs::MetadataExt;
    let mut text = format!("{FORMAT}\n{}\n{}\n", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH);
    let stamp = |m: &std::fs::Metadata| format!("{} {} {} {} {}\n", m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.dev());
    text += &stamp(&std::fs::metadata(std::env::current_exe()?)?);
    let onnx = std::fs::canonicalize(dir.join("model.onnx"))?;
    let source = format!("{}\n{:?}\n", onnx.display(), isa::configured().map_err(std::io::Error::other)?);
    text += &source;
    text += &stamp(&std::fs::metadata(&onnx)?);
    let manifest = std::fs::read(dir.join(crate::engine::manifest::FILE))?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    hash.update(text.as_bytes());
    hash.update(&manifest);
    let name = hash.finish().as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    Ok(PlanKey { name, source })
}

const GRAPH: &str = "graph";
const WEIGHTS: &str = "weights.bin";
const WEIGHTS_INDEX: &str = "weights.json";
const SOURCE: &str = "source.txt";
const DIGEST: &str = "digest.txt";

/// The most a graph, an index or a record of its source may take: SmolLM2's graph is 104 KB.
const SMALL_FILE: u64 = 64 << 20;

/// A small file of an entry, refused unless it is a regular file within [`SMALL_FILE`]: a
/// damaged entry must not make a load read without end (a link to /dev/zero, a FIFO).
fn read_small(path: &Path) -> TractResult<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::symlink_metadata(path)?;
    anyhow::ensure!(meta.is_file(), "{} is not a regular file", path.display());
    anyhow::ensure!(meta.len() <= SMALL_FILE, "{} is {} bytes, more than a plan's ever is", path.display(), meta.len());
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(SMALL_FILE).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// What an entry's `digest.txt` holds: a hash of its graph, index and source and of the head
/// of every weight record (its kind, sizes, code width and layout). A damaged or edited entry
/// whose files still parse (a layout number changed, two keys swapped) is refused, not run.
/// The weights' bulk is not hashed: that would cost as much as the cache saves, and a flipped
/// bit there is what one in model.onnx would be.
fn digest(entry: &Path, index: &WeightIndex) -> TractResult<String> {
    use std::os::unix::fs::FileExt;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    for file in [entry.join(GRAPH).join("graph.nnef"), entry.join(WEIGHTS_INDEX), entry.join(SOURCE)] {
        let bytes = read_small(&file)?;
        hash.update(&(bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
    }
    let weights = std::fs::File::open(entry.join(WEIGHTS))?;
    let mut records: Vec<(u64, u64)> = index.values().copied().collect();
    records.sort_unstable();
    records.dedup();
    let mut head = [0u8; 64];
    for (at, len) in records {
        let take = len.min(head.len() as u64) as usize;
        weights.read_exact_at(&mut head[..take], at)?;
        hash.update(&at.to_le_bytes());
        hash.update(&len.to_le_bytes());
        hash.update(&head[..take]);
    }
    Ok(hash.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// tract's NNEF with the transformer, ONNX and engine registries: every op a plan holds.
fn framework() -> tract_nnef::framework::Nnef {
    tract_nnef::nnef().with_tract_transformers().with_onnx().with_registry(nnef::registry())
}

fn write_entry(temp: &Path, model: &TypedModel, source: &str) -> TractResult<()> {
    let _ = std::fs::remove_dir_all(temp);
    std::fs::create_dir_all(temp)?;
    std::fs::write(temp.join(SOURCE), source)?;
    framework().write_to_dir(model, temp.join(GRAPH))?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(temp.join(WEIGHTS))?);
    let index = nnef::write_weights(model, &mut out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::write(temp.join(WEIGHTS_INDEX), serde_json::to_vec(&index)?)?;
    std::fs::write(temp.join(DIGEST), digest(temp, &index)?)?;
    Ok(())
}

fn read_entry(entry: &Path, source: &str) -> TractResult<TypedModel> {
    // An entry copied or renamed from another model's is not this model's plan.
    let made_from = String::from_utf8_lossy(&read_small(&entry.join(SOURCE))?).into_owned();
    anyhow::ensure!(made_from == source, "it was made from {:?}, not from {:?}", made_from.trim(), source.trim());
    let index: WeightIndex = serde_json::from_slice(&read_small(&entry.join(WEIGHTS_INDEX))?)?;
    anyhow::ensure!(read_small(&entry.join(DIGEST))? == digest(entry, &index)?.as_bytes(), "its files are not the ones it was written with");
    // tract reads every file of the graph's directory: each must be a plain file.
    let graph = entry.join(GRAPH);
    anyhow::ensure!(std::fs::symlink_metadata(&graph)?.is_dir(), "{} is not a directory", graph.display());
    for file in std::fs::read_dir(&graph)? {
        let file = file?;
        anyhow::ensure!(file.file_type()?.is_file(), "{} is not a regular file", file.path().display());
    }
    let store = WeightStore::open(&entry.join(WEIGHTS), index)?;
    let framework = framework();
    let mut proto = framework.proto_model_for_path(entry.join(GRAPH))?;
    proto.resources.insert(nnef::WEIGHTS.to_string(), Arc::new(store));
    framework.model_for_proto_model(&proto)
}

/// Bytes of the files under `path`.
fn tree_bytes(path: &Path) -> u64 {
    let Ok(listing) = std::fs::read_dir(path) else { return 0 };
    listing
        .flatten()
        .map(|item| match item.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&item.path()),
            _ => item.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}
