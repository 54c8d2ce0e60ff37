//! Which cores inference runs on. On big.LITTLE SoCs the fast cores matter: the RK3588 of the
//! Orange Pi 5 has four Cortex-A76 (cpu4–7, `cpu_capacity` 1024) and four Cortex-A55
//! (cpu0–3, about 400), and a thread that lands on a little core runs at a fraction of the
//! speed. The kernel ranks cores in `cpu_capacity`; where that is missing, the highest
//! `cpufreq/cpuinfo_max_freq` stands in.

use std::path::Path;

/// How `engine.cpu_affinity` chose the inference cores. In the configuration it is a string:
/// "auto", "off" or a CPU list such as "4-7".
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Affinity {
    /// Fast cores of a heterogeneous SoC; nothing on a uniform machine.
    Auto,
    Off,
    List(Vec<usize>),
}

impl std::str::FromStr for Affinity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            list => parse_list(list).map(Self::List),
        }
    }
}

impl TryFrom<String> for Affinity {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Affinity> for String {
    fn from(a: Affinity) -> String {
        match a {
            Affinity::Auto => "auto".into(),
            Affinity::Off => "off".into(),
            Affinity::List(l) => l.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
        }
    }
}

/// "0-3,6" → [0, 1, 2, 3, 6] (sorted, no repeats).
pub fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("{s:?} is not \"auto\", \"off\" or a CPU list like \"4-7\" or \"0,2\"");
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                if a > b || b >= 1024 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad()).and_then(|n: usize| if n < 1024 { Ok(n) } else { Err(bad()) })?),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The online cores with the highest capacity (or maximum frequency), read under `root`
/// (`/sys/devices/system/cpu`). Returns every online core when they are all alike, and
/// an empty list when nothing can be read.
pub fn fastest(root: &Path) -> Vec<usize> {
    let online = std::fs::read_to_string(root.join("online")).ok().and_then(|s| parse_list(s.trim()).ok()).unwrap_or_default();
    let read = |cpu: usize, file: &str| -> Option<u64> { std::fs::read_to_string(root.join(format!("cpu{cpu}/{file}"))).ok()?.trim().parse().ok() };
    let rank: Vec<(usize, Option<u64>)> = online
        .iter()
        .map(|&c| (c, read(c, "cpu_capacity").or_else(|| read(c, "cpufreq/cpuinfo_max_freq"))))
        .collect();
    let Some(best) = rank.iter().filter_map(|(_, r)| *r).max() else { return online };
    rank.into_iter().filter(|(_, r)| r.is_none_or(|r| r == best)).map(|(c, _)| c).collect()
}

/// True when the machine's online cores differ in capacity (big.LITTLE).
pub fn heterogeneous(root: &Path) -> bool {
    let online = std::fs::read_to_string(root.join("online")).ok().and_then(|s| parse_list(s.trim()).ok()).unwrap_or_default();
    let fast = fastest(root);
    !fast.is_empty() && fast.len() < online.len()
}

/// The cores the configuration asks for on this machine, or None to leave scheduling alone.
pub fn resolve(a: &Affinity, root: &Path) -> Option<Vec<usize>> {
    match a {
        Affinity::Off => None,
        Affinity::List(l) => Some(l.clone()),
        Affinity::Auto => heterogeneous(root).then(|| fastest(root)),
    }
}

/// Restricts the calling thread, and every thread it starts from now on, to `cpus`.
/// Returns the previous set so it can be restored.
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<Vec<usize>> {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    let old = sched_getaffinity(None)?;
    let previous = (0..CpuSet::MAX_CPU).filter(|&c| old.is_set(c)).collect();
    let mut set = CpuSet::new();
    for &c in cpus.iter().filter(|&&c| c < CpuSet::MAX_CPU) {
        set.set(c);
    }
    sched_setaffinity(None, &set)?;
    Ok(previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(capacities: &[(usize, Option<u64>, Option<u64>)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let n = capacities.len();
        std::fs::write(d.path().join("online"), format!("0-{}\n", n - 1)).unwrap();
        for &(c, cap, freq) in capacities {
            let dir = d.path().join(format!("cpu{c}"));
            std::fs::create_dir_all(dir.join("cpufreq")).unwrap();
            if let Some(cap) = cap {
                std::fs::write(dir.join("cpu_capacity"), format!("{cap}\n")).unwrap();
            }
            if let Some(f) = freq {
                std::fs::write(dir.join("cpufreq/cpuinfo_max_freq"), format!("{f}\n")).unwrap();
            }
        }
        d
    }

    #[test]
    fn the_rk3588_big_cores_are_found() {
        let cores: Vec<_> = (0..8).map(|c| (c, Some(if c < 4 { 414 } else { 1024 }), Some(if c < 4 { 1_800_000 } else { 2_400_000 }))).collect();
        let d = sysfs(&cores);
        assert_eq!(fastest(d.path()), [4, 5, 6, 7]);
        assert_eq!(resolve(&Affinity::Auto, d.path()), Some(vec![4, 5, 6, 7]));
        assert_eq!(resolve(&Affinity::Off, d.path()), None);
    }

    #[test]
    fn frequency_ranks_cores_without_capacity_and_uniform_machines_are_left_alone() {
        let d = sysfs(&[(0, None, Some(1_400_000)), (1, None, Some(2_000_000)), (2, None, Some(2_000_000))]);
        assert_eq!(fastest(d.path()), [1, 2]);
        let d = sysfs(&[(0, Some(1024), None), (1, Some(1024), None)]);
        assert_eq!(fastest(d.path()), [0, 1]);
        assert_eq!(resolve(&Affinity::Auto, d.path()), None);
        assert_eq!(resolve(&Affinity::List(vec![1]), d.path()), Some(vec![1]));
    }

    #[test]
    fn cpu_lists_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_list("0-3,6, 5").unwrap(), [0, 1, 2, 3, 5, 6]);
        assert_eq!("4-7".parse::<Affinity>().unwrap(), Affinity::List(vec![4, 5, 6, 7]));
        for bad in ["", "3-1", "a", "1,,x", "2000"] {
            assert!(parse_list(bad).unwrap_err().contains("CPU list"), "{bad}");
        }
    }

    #[test]
    fn pinning_to_the_allowed_cores_succeeds_and_reports_the_old_set() {
        let all = std::thread::spawn(|| {
            let before = pin_current_thread(&[0]).unwrap();
            let after = pin_current_thread(&before).unwrap();
            (before, after)
        })
        .join()
        .unwrap();
        assert!(all.0.contains(&0));
        assert_eq!(all.1, vec![0]);
    }
}
