//! The plan cache: a model loaded from its cached plan computes exactly what one loaded from
//! its file does, and a cache that is damaged, unwritable or over budget never fails a load.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mulmd::engine::{CacheUse, Model, PlanCache};

/// Every fixture whose plan has a different mix of the engine's ops: float32 panels, 4-bit
/// and 8-bit codes, Q4_1 offsets, the paper's architecture.
const MODELS: [&str; 5] = ["tiny", "tiny-q4", "tiny-q8", "tiny-q4_1", "swen-demo"];

fn load(dir: &Path, cache: &PlanCache) -> Arc<Model> {
    Arc::new(Model::load_with_cache(dir, 1, cache).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display())))
}

/// The logits of a question's prompt and of four greedy steps after it.
fn logits(model: &Arc<Model>) -> Vec<Vec<f32>> {
    let ids = model.prompt_ids(None, "How do I remove odor from inside my shoes?").unwrap();
    let mut session = model.session().unwrap();
    let mut out = vec![session.forward(&ids).unwrap()];
    for _ in 0..4 {
        let last = out.last().unwrap();
        let next = last.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
        out.push(session.forward(&[next as u32]).unwrap());
    }
    out
}

fn bits(logits: &[Vec<f32>]) -> Vec<Vec<u32>> {
    logits.iter().map(|step| step.iter().map(|v| v.to_bits()).collect()).collect()
}

/// The single entry a cache directory holds.
fn entry(cache: &Path) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(cache).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "one model, one entry: {entries:?}");
    entries[0].clone()
}

#[test]
fn a_cached_plan_gives_the_same_logits_to_the_bit() {
    for name in MODELS {
        let Some(dir) = common::fixture(name) else { return };
        let root = tempfile::tempdir().unwrap();
        let cache = PlanCache::at(root.path().join("plans"), 1024);
        let first = load(&dir, &cache);
        assert_eq!(first.plan_cache, CacheUse::Stored, "{name}: the first load makes and stores the plan");
        let second = load(&dir, &cache);
        assert_eq!(second.plan_cache, CacheUse::Hit, "{name}: the second load reads the stored plan");
        assert_eq!(bits(&logits(&first)), bits(&logits(&second)), "{name}: the cached plan computes differently");
        assert_eq!(second.prefilled_head_tokens(), first.prefilled_head_tokens());
    }
}

#[test]
fn the_float32_smollm2_plan_round_trips() {
    let Some(dir) = common::fixture("smollm2") else { return };
    let root = tempfile::tempdir().unwrap();
    let cache = PlanCache::at(root.path().to_path_buf(), 4096);
    let first = load(&dir, &cache);
    let second = load(&dir, &cache);
    assert_eq!((first.plan_cache, second.plan_cache), (CacheUse::Stored, CacheUse::Hit));
    assert_eq!(bits(&logits(&first)), bits(&logits(&second)));
}

/// Damage done to an entry, each of which must send the load back to the model file.
fn damage(entry: &Path, how: usize) {
    let weights = entry.join("weights.bin");
    match how {
        // Truncated weights, as a full disk leaves them.
        0 => std::fs::File::options().write(true).open(&weights).unwrap().set_len(100).unwrap(),
        // Weights overwritten with other bytes: every record's fields are nonsense.
        1 => {
            let len = std::fs::metadata(&weights).unwrap().len() as usize;
            std::fs::write(&weights, vec![0xa7u8; len]).unwrap();
        }
        // An index that is not JSON.
        2 => std::fs::write(entry.join("weights.json"), b"{\"not json").unwrap(),
        // An index whose records lie past the file's end.
        3 => std::fs::write(entry.join("weights.json"), br#"{"x": [18446744073709551000, 4096]}"#).unwrap(),
        // A graph that is not NNEF.
        4 => std::fs::write(entry.join("graph/graph.nnef"), b"version 1.0;\ngraph g( ) -> ( ) { x = ;").unwrap(),
        // The graph gone.
        5 => std::fs::remove_dir_all(entry.join("graph")).unwrap(),
        // Another model's entry under this one's name (its record of what it was made from).
        6 => std::fs::write(entry.join("source.txt"), "/elsewhere/model.onnx\nAvx2\n").unwrap(),
        // A graph that reads back but does not fit the manifest: one output fewer.
        7 => {
            let graph = entry.join("graph/graph.nnef");
            let text = std::fs::read_to_string(&graph).unwrap();
            let (fragments, graph_line) = text.split_once("\ngraph ").unwrap();
            let (head, rest) = graph_line.split_once("->").unwrap();
            let head = format!("{fragments}\ngraph {head}");
            let (outputs, body) = rest.split_once(')').unwrap();
            let fewer = outputs.rsplit_once(',').unwrap().0;
            std::fs::write(&graph, format!("{head}->{fewer}){body}")).unwrap();
        }
        // The graph a link to an endless file: refused, not read without end.
        8 => {
            std::fs::remove_file(entry.join("graph/graph.nnef")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", entry.join("graph/graph.nnef")).unwrap();
        }
        // The index a directory: the entry must still be replaced, not block storing for ever.
        9 => {
            std::fs::remove_file(entry.join("weights.json")).unwrap();
            std::fs::create_dir(entry.join("weights.json")).unwrap();
        }
        // Every record's layout field zeroed, the file's length unchanged: every size still
        // fits, so only the entry's digest tells the weights would be misread.
        10 => {
            let index: std::collections::HashMap<String, (u64, u64)> =
                serde_json::from_slice(&std::fs::read(entry.join("weights.json")).unwrap()).unwrap();
            let file = std::fs::File::options().write(true).open(&weights).unwrap();
            for (at, _) in index.values() {
                std::os::unix::fs::FileExt::write_all_at(&file, &0u64.to_le_bytes(), at + 32).unwrap();
            }
        }
        // Two products' weights swapped in the graph: both still parse and fit.
        11 => {
            let graph = entry.join("graph/graph.nnef");
            let text = std::fs::read_to_string(&graph).unwrap();
            let keys: Vec<&str> = text.split("weights = \"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
            let (a, b) = (keys[0].to_string(), keys.iter().find(|k| **k != keys[0]).unwrap().to_string());
            let swapped = text.replace(&format!("\"{a}\""), "\"SWAP\"").replace(&format!("\"{b}\""), &format!("\"{a}\"")).replace("\"SWAP\"", &format!("\"{b}\""));
            std::fs::write(&graph, swapped).unwrap();
        }
        _ => unreachable!(),
    }
}

#[test]
fn a_damaged_entry_is_replaced_and_the_model_still_loads() {
    let Some(dir) = common::fixture("tiny-q4") else { return };
    let reference = bits(&logits(&load(&dir, &PlanCache::off())));
    for how in 0..12 {
        let root = tempfile::tempdir().unwrap();
        let cache = PlanCache::at(root.path().to_path_buf(), 1024);
        load(&dir, &cache);
        damage(&entry(root.path()), how);
        let model = load(&dir, &cache);
        assert_eq!(model.plan_cache, CacheUse::Stored, "damage {how}: the plan must be made from the file and stored again");
        assert_eq!(bits(&logits(&model)), reference, "damage {how}");
        assert_eq!(load(&dir, &cache).plan_cache, CacheUse::Hit, "damage {how}: the stored-again entry must be read");
    }
}

#[test]
fn an_unwritable_cache_does_not_stop_a_load() {
    let Some(dir) = common::fixture("tiny-q4") else { return };
    let root = tempfile::tempdir().unwrap();
    // A file where the cache directory should be: nothing can be created under it.
    let blocked = root.path().join("plans");
    std::fs::write(&blocked, b"").unwrap();
    let model = load(&dir, &PlanCache::at(blocked, 1024));
    assert_eq!(model.plan_cache, CacheUse::Unstored);
    assert!(!logits(&model).is_empty());
}

#[test]
fn off_reads_the_model_file_every_time() {
    let Some(dir) = common::fixture("tiny-q4") else { return };
    assert_eq!(load(&dir, &PlanCache::off()).plan_cache, CacheUse::Off);
    assert_eq!(load(&dir, &PlanCache::at(PathBuf::from("/nonexistent/never"), 0)).plan_cache, CacheUse::Off, "a budget of 0 keeps nothing");
}

#[test]
fn the_budget_drops_the_least_recently_used_plan() {
    let (Some(f32), Some(q8)) = (common::fixture("tiny"), common::fixture("tiny-q8")) else { return };
    let root = tempfile::tempdir().unwrap();
    // Room for either plan (about 6.7 and 2.6 MB), not both.
    let cache = PlanCache::at(root.path().to_path_buf(), 8);
    assert_eq!(load(&f32, &cache).plan_cache, CacheUse::Stored);
    let f32_entry = entry(root.path());
    assert_eq!(load(&q8, &cache).plan_cache, CacheUse::Stored);
    assert!(!f32_entry.exists(), "the older plan goes when the newer one does not fit beside it");
    assert_eq!(load(&q8, &cache).plan_cache, CacheUse::Hit);
    assert_eq!(load(&f32, &cache).plan_cache, CacheUse::Stored, "the dropped plan is made again");
    assert_eq!(entry(root.path()), f32_entry, "and the other one dropped in its turn");
    // A plan larger than the whole budget is not kept.
    let small = PlanCache::at(root.path().join("small"), 1);
    assert_eq!(load(&q8, &small).plan_cache, CacheUse::Unstored);
}

#[test]
fn a_changed_model_file_gets_a_new_plan() {
    let Some(fixture) = common::fixture("tiny-q4") else { return };
    let copy = tempfile::tempdir().unwrap();
    for file in std::fs::read_dir(&fixture).unwrap().flatten() {
        std::fs::copy(file.path(), copy.path().join(file.file_name())).unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    let cache = PlanCache::at(root.path().to_path_buf(), 1024);
    assert_eq!(load(copy.path(), &cache).plan_cache, CacheUse::Stored);
    // Replaced with another model's file of the same name (the 8-bit export).
    let q8 = common::fixture("tiny-q8").unwrap();
    std::fs::copy(q8.join("model.onnx"), copy.path().join("model.onnx")).unwrap();
    std::fs::copy(q8.join("mulm.json"), copy.path().join("mulm.json")).unwrap();
    let replaced = load(copy.path(), &cache);
    assert_eq!(replaced.plan_cache, CacheUse::Stored, "a replaced model file must not be answered by the old plan");
    entry(root.path()); // and the old plan, never to be read again, is gone
    assert_eq!(bits(&logits(&replaced)), bits(&logits(&load(&q8, &PlanCache::off()))));
}
