//! Which cases a run takes: `--case` filters and `--partition N/M` splits.
//!
//! Cases joined by identity groups (directly or through a chain of groups) form one unit, found
//! by union-find, and a unit is never split: a filter that selects part of a unit runs the whole
//! unit (and says so), and partitions deal whole units. Units go to partitions by a stable hash
//! of their first case name, so adding a case never moves the others to another partition.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::suite::Suite;

/// Union-find over case indices.
struct Units {
    parent: Vec<usize>,
}

impl Units {
    fn new(n: usize) -> Self {
        Units { parent: (0..n).collect() }
    }

    fn find(&mut self, x: usize) -> usize {
        let mut root = x;
        while self.parent[root] != root {
            root = self.parent[root];
        }
        let mut x = x;
        while self.parent[x] != root {
            let next = self.parent[x];
            self.parent[x] = root;
            x = next;
        }
        root
    }

    fn join(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// Groups of case indices that must run together, each sorted, in suite order.
pub fn units(suite: &Suite) -> Vec<Vec<usize>> {
    let mut u = Units::new(suite.cases.len());
    let index = |name: &str| suite.cases.iter().position(|c| c.name.as_str() == name);
    for g in &suite.identity_groups {
        let members: Vec<usize> = g.cases.iter().filter_map(|c| index(c.as_str())).collect();
        for w in members.windows(2) {
            u.join(w[0], w[1]);
        }
    }
    let mut by_root: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..suite.cases.len() {
        let r = u.find(i);
        by_root.entry(r).or_default().push(i);
    }
    by_root.into_values().collect()
}

/// Which of `m` partitions a unit belongs to (0-based): a stable hash of its first case name.
pub fn partition_of(first_case: &str, m: usize) -> usize {
    let h = crate::fsutil::content_hash(first_case.as_bytes());
    (u64::from_str_radix(&h[..16], 16).unwrap_or(0) % m as u64) as usize
}

/// Keeps the selected cases of `suite` (and the identity groups whose cases all remain).
/// Returns notes for the user (cases added to keep a group whole). The selection may be
/// empty; [`describe_empty`] says why.
pub fn select(suite: &mut Suite, partition: Option<(usize, usize)>, filter: Option<&str>) -> Result<Vec<String>> {
    let units = units(suite);
    let mut keep: BTreeSet<usize> = BTreeSet::new();
    let mut notes = Vec::new();
    if let Some(f) = filter {
        let hits: BTreeSet<usize> = suite.cases.iter().enumerate().filter(|(_, c)| c.name.as_str().contains(f)).map(|(i, _)| i).collect();
        for u in &units {
            if u.iter().any(|i| hits.contains(i)) {
                let added: Vec<&str> = u.iter().filter(|i| !hits.contains(i)).map(|&i| suite.cases[i].name.as_str()).collect();
                if !added.is_empty() {
                    notes.push(format!("--case `{f}` also runs {}: identity groups join them to the cases it matched", added.join(", ")));
                }
                keep.extend(u.iter().copied());
            }
        }
    } else {
        keep.extend(0..suite.cases.len());
    }
    if let Some((n, m)) = partition {
        if m == 0 || n == 0 || n > m {
            return Err(Error::invalid(format!("partition {n}/{m}: use N/M with 1 ≤ N ≤ M")));
        }
        let mine: BTreeSet<usize> = units.iter().filter(|u| partition_of(suite.cases[u[0]].name.as_str(), m) == n - 1).flatten().copied().collect();
        keep.retain(|i| mine.contains(i));
    }
    let mut i = 0;
    suite.cases.retain(|_| {
        i += 1;
        keep.contains(&(i - 1))
    });
    let names: BTreeSet<String> = suite.cases.iter().map(|c| c.name.to_string()).collect();
    suite.identity_groups.retain(|g| g.cases.iter().all(|c| names.contains(c.as_str())));
    Ok(notes)
}

/// Why a selection of `full` is empty, for the "no checks to run" message.
pub fn describe_empty(full: &Suite, partition: Option<(usize, usize)>, filter: Option<&str>) -> String {
    let names: Vec<&str> = full.cases.iter().map(|c| c.name.as_str()).collect();
    match (filter, partition) {
        (Some(f), _) if !names.iter().any(|n| n.contains(f)) => format!("no case of suite `{}` matches --case `{f}` (cases: {})", full.name, names.join(", ")),
        (_, Some((n, m))) => format!("partition {n}/{m} of suite `{}` holds none of the selected cases", full.name),
        _ => format!("suite `{}` selects no case", full.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::validate::parse_suite;
    use std::path::Path;

    fn suite(cases: &[&str], groups: &[&[&str]]) -> Suite {
        let mut y = String::from("name: t\ncases:\n");
        for c in cases {
            y.push_str(&format!("  - name: {c}\n    prompt: \"red circle\"\n"));
        }
        if !groups.is_empty() {
            y.push_str("identity_groups:\n");
            for (i, g) in groups.iter().enumerate() {
                y.push_str(&format!("  - name: g{i}\n    cases: [{}]\n", g.join(", ")));
            }
        }
        parse_suite(Path::new("t.yaml"), &y).unwrap()
    }

    fn names(s: &Suite) -> Vec<String> {
        s.cases.iter().map(|c| c.name.to_string()).collect()
    }

    #[test]
    fn a_chain_of_groups_is_one_unit_and_no_partition_drops_a_group() {
        // A=[a,b], B=[c,d], C=[b,c]: a, b, c, d must run together.
        let s = suite(&["a", "b", "c", "d", "e"], &[&["a", "b"], &["c", "d"], &["b", "c"]]);
        let u = units(&s);
        assert_eq!(u, vec![vec![0, 1, 2, 3], vec![4]]);
        for m in 1..=4 {
            let mut seen = Vec::new();
            let mut groups = 0;
            for n in 1..=m {
                let mut p = s.clone();
                select(&mut p, Some((n, m)), None).unwrap();
                groups += p.identity_groups.len();
                seen.extend(names(&p));
            }
            seen.sort();
            assert_eq!(seen, ["a", "b", "c", "d", "e"], "each case in exactly one of {m} partitions");
            assert_eq!(groups, 3, "every group runs in some partition of {m}");
        }
    }

    #[test]
    fn adding_a_case_moves_no_other_case_to_another_partition() {
        let before = suite(&["alpha", "beta", "gamma", "delta", "eps"], &[]);
        let after = suite(&["alpha", "new-one", "beta", "gamma", "delta", "eps"], &[]);
        for n in 1..=3 {
            let (mut a, mut b) = (before.clone(), after.clone());
            select(&mut a, Some((n, 3)), None).unwrap();
            select(&mut b, Some((n, 3)), None).unwrap();
            let b: Vec<String> = names(&b).into_iter().filter(|x| x != "new-one").collect();
            assert_eq!(names(&a), b, "partition {n}/3");
        }
    }

    #[test]
    fn a_filter_keeps_groups_whole_and_an_empty_filter_says_why() {
        let s = suite(&["sword-girl", "staff-girl", "other"], &[&["sword-girl", "staff-girl"]]);
        let mut f = s.clone();
        let notes = select(&mut f, None, Some("sword")).unwrap();
        assert_eq!(names(&f), ["sword-girl", "staff-girl"]);
        assert_eq!(f.identity_groups.len(), 1);
        assert!(notes[0].contains("also runs staff-girl"), "{notes:?}");
        let mut f = s.clone();
        select(&mut f, None, Some("nothing")).unwrap();
        assert!(f.cases.is_empty());
        assert!(describe_empty(&s, None, Some("nothing")).contains("no case of suite `t` matches --case `nothing` (cases: sword-girl, staff-girl, other)"));
        assert!(select(&mut s.clone(), Some((3, 2)), None).is_err());
    }
}
