//! Where a forward pass spends its time, by kind of op (the plan's op names: the engine's
//! `QuantizedMatMul`, `F32MatMul`, `Attention`, tract's `ApplyRope`, …), for `mulmd probe
//! --profile`: the evidence behind bench/RESULTS.md's account of what limits each model,
//! reproducible on the board itself.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Time per op kind, summed over `passes` forward passes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpProfile {
    pub passes: usize,
    pub ops: BTreeMap<String, OpTime>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpTime {
    pub ms: f64,
    pub calls: usize,
}

impl OpProfile {
    pub(crate) fn add(&mut self, op: &str, took: Duration) {
        let t = self.ops.entry(op.to_string()).or_default();
        t.ms += took.as_secs_f64() * 1e3;
        t.calls += 1;
    }

    /// All ops' time, in ms.
    pub fn total_ms(&self) -> f64 {
        self.ops.values().map(|t| t.ms).sum()
    }

    /// Op kinds, most expensive first.
    pub fn ranked(&self) -> Vec<(&str, &OpTime)> {
        let mut v: Vec<_> = self.ops.iter().map(|(k, t)| (k.as_str(), t)).collect();
        v.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_op_and_ranks_by_time() {
        let mut p = OpProfile::default();
        p.add("Add", Duration::from_micros(100));
        p.add("OptMatMul", Duration::from_millis(2));
        p.add("Add", Duration::from_micros(300));
        assert_eq!(p.ops["Add"].calls, 2);
        assert!((p.ops["Add"].ms - 0.4).abs() < 1e-9);
        assert_eq!(p.ranked().iter().map(|(k, _)| *k).collect::<Vec<_>>(), ["OptMatMul", "Add"]);
        assert!((p.total_ms() - 2.4).abs() < 1e-9);
    }
}
