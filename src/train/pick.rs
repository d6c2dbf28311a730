//! Which checkpoint to ship, and when to stop: pure functions over what each checkpoint
//! measured (held-out loss, the validation suite's verdict and scores), so the rules are
//! unit-tested apart from training.
//!
//! **`best`** (the default): checkpoints that pass every check come first (when none does, those
//! with the fewest failures). Among them, each criterion ranks the checkpoints (1 = best, ties
//! share the mean rank): the held-out loss (lower is better) and the suite's CLIP mean, identity
//! and diversity (higher is better). The pick has the lowest mean rank; ties go to the lower
//! held-out loss, then to the later step. A rank sum, not the lowest held-out loss: the held-out
//! loss is an average over a few images and timesteps, and its differences between late
//! checkpoints are often smaller than its noise, so it gets one vote, as each of the suite's
//! scores does, and cannot pick alone on a fluke. The effect (mean change against the base
//! model) is charted but not ranked: a floor check, more of it is not better.
//!
//! **`latest-passing`**: the latest checkpoint that passes every check (the behaviour before
//! `pick` existed).
//!
//! **Early stopping** ([`stop_reason`]): an evaluation improves when its held-out loss is below
//! every earlier one, or it fails fewer checks than every earlier one, or any ranked suite score
//! is above every earlier one. Training stops once the last `patience` evaluations improved
//! nothing. Any improvement counts, so a run still getting better on one axis goes on.

use super::config::PickRule;

/// The suite's numbers for one checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuiteScores {
    pub passed: usize,
    pub failed: usize,
    /// Mean CLIP score over the `clip` checks.
    pub clip: Option<f64>,
    /// Mean identity similarity over the `identity` checks.
    pub identity: Option<f64>,
    /// Mean seed-to-seed variety over the `diversity` checks.
    pub diversity: Option<f64>,
    /// Mean abs pixel change against the base model over the `effect` checks.
    pub effect: Option<f64>,
}

impl SuiteScores {
    /// Passes every check (and checked something).
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }

    /// The ranked scores, higher is better, by name.
    pub fn ranked(&self) -> [(&'static str, Option<f64>); 3] {
        [("CLIP", self.clip), ("identity", self.identity), ("diversity", self.diversity)]
    }
}

/// What one checkpoint measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub step: usize,
    /// Held-out loss, when `validation_split` is set.
    pub heldout: Option<f64>,
    /// The suite's numbers, when the suite ran at this checkpoint.
    pub suite: Option<SuiteScores>,
}

/// The checkpoint chosen, and why in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// `None`: nothing qualifies (the last step's LoRA is written).
    pub step: Option<usize>,
    pub reason: String,
}

/// Ranks of `values` (lower rank = better), ties sharing the mean of their ranks; `None` for
/// missing values.
pub fn ranks(values: &[Option<f64>], higher_is_better: bool) -> Vec<Option<f64>> {
    let mut present: Vec<(usize, f64)> = values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).collect();
    present.sort_by(|a, b| {
        let o = a.1.total_cmp(&b.1);
        if higher_is_better { o.reverse() } else { o }
    });
    let mut out = vec![None; values.len()];
    let mut i = 0;
    while i < present.len() {
        let mut j = i + 1;
        while j < present.len() && present[j].1 == present[i].1 {
            j += 1;
        }
        // Positions i..j (0-based) share the mean of ranks i+1..=j.
        let r = (i + 1 + j) as f64 / 2.0;
        for &(k, _) in &present[i..j] {
            out[k] = Some(r);
        }
        i = j;
    }
    out
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

/// Chooses the checkpoint to ship by `rule` (see the module docs).
pub fn choose(evals: &[Evaluation], rule: PickRule) -> Choice {
    let suite_ran = evals.iter().any(|e| e.suite.is_some());
    // With a suite, only checkpoints it judged can be shipped.
    let judged: Vec<&Evaluation> = evals.iter().filter(|e| !suite_ran || e.suite.is_some()).collect();
    if judged.is_empty() {
        return Choice { step: None, reason: "nothing was evaluated: the last step's LoRA is kept".into() };
    }
    let ok = |e: &Evaluation| e.suite.as_ref().is_none_or(SuiteScores::ok);
    if rule == PickRule::LatestPassing {
        return match judged.iter().filter(|e| ok(e)).max_by_key(|e| e.step) {
            Some(e) if suite_ran => Choice { step: Some(e.step), reason: format!("step {}: the latest checkpoint that passes every check (pick: latest-passing)", e.step) },
            Some(e) => Choice { step: Some(e.step), reason: format!("step {}: the latest checkpoint (no validation suite; pick: latest-passing)", e.step) },
            None => Choice { step: None, reason: "no checkpoint passed every check: the last step's LoRA is kept (pick: latest-passing)".into() },
        };
    }
    let passing: Vec<&Evaluation> = judged.iter().copied().filter(|e| ok(e)).collect();
    let (pool, head) = if !passing.is_empty() {
        let head = if suite_ran {
            format!("passes every check ({} of {} checkpoints do)", passing.len(), judged.len())
        } else {
            "no validation suite, so the held-out loss alone ranks".to_string()
        };
        (passing, head)
    } else {
        let fewest = judged.iter().filter_map(|e| e.suite.as_ref().map(|s| s.failed)).min().unwrap_or(0);
        let pool: Vec<&Evaluation> = judged.iter().copied().filter(|e| e.suite.as_ref().map(|s| s.failed) == Some(fewest)).collect();
        (pool, format!("NO checkpoint passes every check; this one has the fewest failures ({fewest})"))
    };

    // Each criterion's values and ranks within the pool.
    struct Criterion {
        name: &'static str,
        ranks: Vec<Option<f64>>,
        values: Vec<Option<f64>>,
    }
    let mut criteria: Vec<Criterion> = Vec::new();
    let heldout: Vec<Option<f64>> = pool.iter().map(|e| e.heldout).collect();
    criteria.push(Criterion { name: "held-out loss", ranks: ranks(&heldout, false), values: heldout });
    for k in 0..3 {
        let values: Vec<Option<f64>> = pool.iter().map(|e| e.suite.as_ref().and_then(|s| s.ranked()[k].1)).collect();
        let name = SuiteScores::default().ranked()[k].0;
        criteria.push(Criterion { name, ranks: ranks(&values, true), values });
    }
    criteria.retain(|c| c.ranks.iter().any(Option::is_some));
    let mean_rank: Vec<f64> = (0..pool.len())
        .map(|i| {
            let rs: Vec<f64> = criteria.iter().filter_map(|c| c.ranks[i]).collect();
            if rs.is_empty() { f64::INFINITY } else { rs.iter().sum::<f64>() / rs.len() as f64 }
        })
        .collect();
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.sort_by(|&a, &b| {
        mean_rank[a]
            .total_cmp(&mean_rank[b])
            .then(pool[a].heldout.unwrap_or(f64::INFINITY).total_cmp(&pool[b].heldout.unwrap_or(f64::INFINITY)))
            .then(pool[b].step.cmp(&pool[a].step))
    });
    let w = order[0];
    let chosen = pool[w];
    let reason = if criteria.is_empty() {
        format!("step {}: {head}; nothing ranks them, so the latest", chosen.step)
    } else {
        let parts: Vec<String> = criteria
            .iter()
            .map(|c| format!("{} {} (rank {})", c.name, fmt_opt(c.values[w]), c.ranks[w].map(|r| format!("{r}")).unwrap_or_else(|| "-".into())))
            .collect();
        let tie = order.len() > 1 && mean_rank[order[1]] == mean_rank[w];
        format!(
            "step {}: {head}; best mean rank {:.2} of {} over {}{}",
            chosen.step,
            mean_rank[w],
            pool.len(),
            parts.join(", "),
            if tie { format!(" (tied with step {}: lower held-out loss, then the later step, wins)", pool[order[1]].step) } else { String::new() }
        )
    };
    Choice { step: Some(chosen.step), reason }
}

/// Why to stop now, if the last `patience` evaluations improved nothing (see the module docs).
pub fn stop_reason(evals: &[Evaluation], patience: usize) -> Option<String> {
    let mut best_loss = f64::INFINITY;
    let mut fewest_failed = usize::MAX;
    let mut best_scores = [f64::NEG_INFINITY; 3];
    let mut last_improved: Option<usize> = None;
    for (i, e) in evals.iter().enumerate() {
        let mut improved = false;
        if let Some(l) = e.heldout
            && l < best_loss
        {
            best_loss = l;
            improved = true;
        }
        if let Some(s) = &e.suite {
            if s.failed < fewest_failed {
                fewest_failed = s.failed;
                improved = true;
            }
            for (k, (_, v)) in s.ranked().iter().enumerate() {
                if let Some(v) = v
                    && *v > best_scores[k]
                {
                    best_scores[k] = *v;
                    improved = true;
                }
            }
        }
        if improved {
            last_improved = Some(i);
        }
    }
    let since = match last_improved {
        Some(i) => evals.len() - 1 - i,
        None => evals.len(),
    };
    if since < patience || patience == 0 {
        return None;
    }
    let best_step = last_improved.map(|i| evals[i].step);
    let steps: Vec<String> = evals[evals.len() - since..].iter().map(|e| e.step.to_string()).collect();
    Some(format!(
        "neither the held-out loss nor the suite's scores improved for {since} evaluation(s) (steps {}; patience {patience}){}",
        steps.join(", "),
        best_step.map(|s| format!("; the last improvement was at step {s}")).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(failed: usize, clip: f64, identity: f64, diversity: f64) -> Option<SuiteScores> {
        Some(SuiteScores { passed: 10 - failed, failed, clip: Some(clip), identity: Some(identity), diversity: Some(diversity), effect: Some(0.1) })
    }

    fn ev(step: usize, heldout: f64, s: Option<SuiteScores>) -> Evaluation {
        Evaluation { step, heldout: Some(heldout), suite: s }
    }

    #[test]
    fn ranks_share_ties_and_skip_missing_values() {
        assert_eq!(ranks(&[Some(0.3), Some(0.1), Some(0.2)], false), vec![Some(3.0), Some(1.0), Some(2.0)]);
        assert_eq!(ranks(&[Some(0.3), Some(0.1), Some(0.2)], true), vec![Some(1.0), Some(3.0), Some(2.0)]);
        assert_eq!(ranks(&[Some(1.0), None, Some(1.0), Some(0.5)], true), vec![Some(1.5), None, Some(1.5), Some(3.0)]);
    }

    #[test]
    fn best_ranks_passing_checkpoints_first_then_by_mean_rank() {
        let evals = vec![
            // The lowest held-out loss, but it fails a check.
            ev(100, 0.10, suite(1, 0.50, 0.50, 0.50)),
            // Second-lowest loss and the best suite scores: mean rank (1+1+1+1)/4 = 1 among the passing.
            ev(200, 0.12, suite(0, 0.45, 0.40, 0.40)),
            ev(300, 0.14, suite(0, 0.40, 0.35, 0.35)),
        ];
        let c = choose(&evals, PickRule::Best);
        assert_eq!(c.step, Some(200), "{}", c.reason);
        assert!(c.reason.contains("passes every check (2 of 3"), "{}", c.reason);
        assert!(c.reason.contains("best mean rank 1.00 of 2"), "{}", c.reason);
        assert!(c.reason.contains("held-out loss 0.1200 (rank 1)"), "{}", c.reason);
        // latest-passing keeps the old behaviour.
        assert_eq!(choose(&evals, PickRule::LatestPassing).step, Some(300));
    }

    #[test]
    fn a_noisy_held_out_loss_does_not_pick_alone() {
        // Step 300 has a hair lower held-out loss, but every suite score favours step 200.
        let evals = vec![ev(200, 0.1201, suite(0, 0.45, 0.40, 0.40)), ev(300, 0.1200, suite(0, 0.40, 0.35, 0.35))];
        assert_eq!(choose(&evals, PickRule::Best).step, Some(200));
    }

    #[test]
    fn ties_go_to_the_lower_held_out_loss_then_the_later_step() {
        // Mean ranks tie (1.5 each): the held-out loss decides.
        let evals = vec![ev(100, 0.20, suite(0, 0.5, 0.5, 0.4)), ev(200, 0.10, suite(0, 0.4, 0.4, 0.5))];
        let c = choose(&evals, PickRule::Best);
        assert_eq!(c.step, Some(200), "{}", c.reason);
        // Everything equal: the later step.
        let evals = vec![ev(100, 0.1, suite(0, 0.5, 0.5, 0.5)), ev(200, 0.1, suite(0, 0.5, 0.5, 0.5))];
        let c = choose(&evals, PickRule::Best);
        assert_eq!(c.step, Some(200), "{}", c.reason);
        assert!(c.reason.contains("tied with step 100"), "{}", c.reason);
    }

    #[test]
    fn when_none_passes_best_says_so_and_latest_passing_keeps_the_last_step() {
        let evals = vec![ev(100, 0.3, suite(2, 0.5, 0.5, 0.5)), ev(200, 0.2, suite(1, 0.4, 0.4, 0.4)), ev(300, 0.1, suite(3, 0.6, 0.6, 0.6))];
        let c = choose(&evals, PickRule::Best);
        assert_eq!(c.step, Some(200));
        assert!(c.reason.contains("NO checkpoint passes every check") && c.reason.contains("fewest failures (1)"), "{}", c.reason);
        let c = choose(&evals, PickRule::LatestPassing);
        assert_eq!(c.step, None);
        assert!(c.reason.contains("no checkpoint passed every check"), "{}", c.reason);
    }

    #[test]
    fn without_a_suite_the_held_out_loss_ranks_and_unjudged_checkpoints_are_not_shipped() {
        let evals = vec![ev(100, 0.3, None), ev(200, 0.1, None), ev(300, 0.2, None)];
        let c = choose(&evals, PickRule::Best);
        assert_eq!(c.step, Some(200));
        assert!(c.reason.contains("held-out loss alone"), "{}", c.reason);
        assert_eq!(choose(&evals, PickRule::LatestPassing).step, Some(300));
        // A checkpoint the suite skipped (checkpoint_every < validation_every) is not a candidate.
        let evals = vec![ev(100, 0.05, None), ev(200, 0.1, suite(0, 0.5, 0.5, 0.5))];
        assert_eq!(choose(&evals, PickRule::Best).step, Some(200));
        assert_eq!(choose(&[], PickRule::Best).step, None);
    }

    #[test]
    fn early_stopping_stops_at_the_right_evaluation() {
        // Held-out loss: 0.5, 0.4, 0.45, 0.41, 0.42 — best at the second; patience 2 stops at
        // the fourth (two evaluations without improvement), not before.
        let losses = [0.5, 0.4, 0.45, 0.41, 0.42];
        let evals: Vec<Evaluation> = losses.iter().enumerate().map(|(i, &l)| Evaluation { step: (i + 1) * 100, heldout: Some(l), suite: None }).collect();
        let first_stop = (1..=evals.len()).find(|&n| stop_reason(&evals[..n], 2).is_some());
        assert_eq!(first_stop, Some(4));
        let why = stop_reason(&evals[..4], 2).unwrap();
        assert!(why.contains("for 2 evaluation(s) (steps 300, 400; patience 2)") && why.contains("last improvement was at step 200"), "{why}");
        assert_eq!((1..=evals.len()).find(|&n| stop_reason(&evals[..n], 3).is_some()), Some(5));
        // A suite score that improves keeps training going although the loss does not.
        let evals = [
            ev(100, 0.4, suite(0, 0.40, 0.4, 0.4)),
            ev(200, 0.5, suite(0, 0.41, 0.4, 0.4)),
            ev(300, 0.5, suite(0, 0.40, 0.4, 0.4)),
            ev(400, 0.5, suite(1, 0.40, 0.4, 0.4)),
        ];
        assert_eq!((1..=evals.len()).find(|&n| stop_reason(&evals[..n], 2).is_some()), Some(4));
        // Fewer failures is an improvement too.
        let evals = vec![ev(100, 0.4, suite(2, 0.4, 0.4, 0.4)), ev(200, 0.5, suite(1, 0.4, 0.4, 0.4)), ev(300, 0.5, suite(1, 0.4, 0.4, 0.4))];
        assert!(stop_reason(&evals, 2).is_none());
        assert!(stop_reason(&evals, 1).is_some());
    }
}
