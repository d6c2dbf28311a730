//! Building one module from the tensors a file holds under its name: which algorithm they
//! spell, and whether their shapes fit each other. Every refusal names the tensors and their
//! shapes; the fit to a model's layer is checked later, when the module is bound.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::algo::{AdapterWeights, Algorithm, Dora, DoraAxis, KronHalf};
use super::keys::Role;

/// The tensors of one module, by role, each with its key.
pub(crate) type Parts = BTreeMap<Role, (String, Tensor)>;

/// A module's checked tensors.
pub(crate) struct Assembled {
    pub weights: AdapterWeights,
    pub dora: Option<Dora>,
}

const LORA: &[Role] = &[Role::Down, Role::Up, Role::Mid];
const HADA: &[Role] = &[Role::HadaW1A, Role::HadaW1B, Role::HadaW2A, Role::HadaW2B, Role::HadaT1, Role::HadaT2];
const LOKR: &[Role] = &[Role::LokrW1, Role::LokrW1A, Role::LokrW1B, Role::LokrW2, Role::LokrW2A, Role::LokrW2B, Role::LokrT2];
const FULL: &[Role] = &[Role::Diff, Role::DiffBias];

/// `` `key` [dims] `` of a part, for messages.
fn show(parts: &Parts, role: Role) -> String {
    match parts.get(&role) {
        Some((k, t)) => format!("`{k}` {:?}", t.dims()),
        None => format!("`{}`", role.kohya_suffix()),
    }
}

/// The tensors' names, for "has … but no …" messages.
fn present(parts: &Parts, roles: &[Role]) -> String {
    let names: Vec<String> = roles.iter().filter_map(|r| parts.get(r).map(|(k, _)| format!("`{k}`"))).collect();
    names.join(", ")
}

/// Builds module `name` from its tensors (alpha is read separately).
pub(crate) fn assemble(name: &str, parts: &Parts) -> Result<Assembled, String> {
    let families: Vec<(Algorithm, &[Role])> = [(Algorithm::Lora, LORA), (Algorithm::LoHa, HADA), (Algorithm::LoKr, LOKR), (Algorithm::Full, FULL)]
        .into_iter()
        .filter(|(_, roles)| roles.iter().any(|r| parts.contains_key(r)))
        .collect();
    let algorithm = match families.as_slice() {
        [] => {
            let what = present(parts, &[Role::Alpha, Role::DoraScale, Role::Magnitude]);
            return Err(format!("module `{name}` has {what} but no weights to apply"));
        }
        [(a, _)] => *a,
        [(a, ra), (b, rb), ..] => {
            return Err(format!(
                "module `{name}` mixes {a} tensors ({}) with {b} tensors ({}); a module has one algorithm",
                present(parts, ra),
                present(parts, rb)
            ));
        }
    };
    let weights = match algorithm {
        Algorithm::Lora => low_rank(name, parts)?,
        Algorithm::LoHa => hadamard(name, parts)?,
        Algorithm::LoKr => kronecker(name, parts)?,
        Algorithm::Full => full(name, parts)?,
    };
    let dora = dora(name, parts, &weights)?;
    Ok(Assembled { weights, dora })
}

fn get(parts: &Parts, role: Role) -> Option<Tensor> {
    parts.get(&role).map(|(_, t)| t.clone())
}

fn need(name: &str, parts: &Parts, algorithm: &str, role: Role, family: &[Role]) -> Result<Tensor, String> {
    get(parts, role).ok_or_else(|| format!("{algorithm} module `{name}` has {} but no `{}`", present(parts, family), role.kohya_suffix()))
}

fn dims_at_least(parts: &Parts, roles: &[Role], n: usize) -> Result<(), String> {
    for r in roles {
        if let Some((k, t)) = parts.get(r)
            && t.rank() < n
        {
            return Err(format!("`{k}` has shape {:?}; it needs at least {n} dimensions", t.dims()));
        }
    }
    Ok(())
}

fn exactly_dims(parts: &Parts, role: Role, n: usize) -> Result<(), String> {
    match parts.get(&role) {
        Some((k, t)) if t.rank() != n => Err(format!("`{k}` has shape {:?}; it must have {n} dimensions", t.dims())),
        _ => Ok(()),
    }
}

fn low_rank(name: &str, parts: &Parts) -> Result<AdapterWeights, String> {
    let down = get(parts, Role::Down).ok_or_else(|| format!("module `{name}` has an up matrix but no down matrix"))?;
    let up = get(parts, Role::Up).ok_or_else(|| format!("module `{name}` has a down matrix but no up matrix"))?;
    if down.rank() < 2 || up.rank() < 2 {
        return Err(format!("module `{name}`: matrices must have at least 2 dimensions, got {:?} and {:?}", down.dims(), up.dims()));
    }
    let rank = down.dims()[0];
    if up.dims()[1] != rank || rank == 0 {
        return Err(format!("module `{name}`: down {:?} and up {:?} disagree on the rank", down.dims(), up.dims()));
    }
    if up.elem_count() != up.dims()[0] * rank {
        return Err(format!("module `{name}`: up {} must be [out, rank] or [out, rank, 1, 1]", show(parts, Role::Up)));
    }
    let mid = get(parts, Role::Mid);
    if let Some(m) = &mid {
        exactly_dims(parts, Role::Mid, 4)?;
        if m.dims()[0] != rank || m.dims()[1] != rank {
            return Err(format!(
                "module `{name}`: the Tucker core {} does not match rank {rank} of {} and {}",
                show(parts, Role::Mid),
                show(parts, Role::Down),
                show(parts, Role::Up)
            ));
        }
        if down.rank() > 2 && down.dims()[2..].iter().any(|&k| k != 1) {
            return Err(format!("module `{name}`: with a Tucker core the down matrix {} must be 1×1", show(parts, Role::Down)));
        }
    }
    Ok(AdapterWeights::LowRank { down, up, mid })
}

fn hadamard(name: &str, parts: &Parts) -> Result<AdapterWeights, String> {
    let n = |r| need(name, parts, "LoHa", r, HADA);
    let (w1a, w1b, w2a, w2b) = (n(Role::HadaW1A)?, n(Role::HadaW1B)?, n(Role::HadaW2A)?, n(Role::HadaW2B)?);
    for r in [Role::HadaW1A, Role::HadaW1B, Role::HadaW2A, Role::HadaW2B] {
        exactly_dims(parts, r, 2)?;
    }
    let t = match (get(parts, Role::HadaT1), get(parts, Role::HadaT2)) {
        (None, None) => None,
        (Some(t1), Some(t2)) => Some((t1, t2)),
        (Some(_), None) => return Err(format!("LoHa module `{name}` has the Tucker core {} but no `hada_t2`", show(parts, Role::HadaT1))),
        (None, Some(_)) => return Err(format!("LoHa module `{name}` has the Tucker core {} but no `hada_t1`", show(parts, Role::HadaT2))),
    };
    let (a1, b1, a2, b2) = (w1a.dims(), w1b.dims(), w2a.dims(), w2b.dims());
    let halves = |shape1: [usize; 2], shape2: [usize; 2]| -> Result<(), String> {
        if shape1 != shape2 {
            return Err(format!(
                "LoHa module `{name}`: its halves make updates of different shapes ({shape1:?} from {} and {}, {shape2:?} from {} and {})",
                show(parts, Role::HadaW1A),
                show(parts, Role::HadaW1B),
                show(parts, Role::HadaW2A),
                show(parts, Role::HadaW2B)
            ));
        }
        Ok(())
    };
    match &t {
        None => {
            for (a, b, ra, rb) in [(a1, b1, Role::HadaW1A, Role::HadaW1B), (a2, b2, Role::HadaW2A, Role::HadaW2B)] {
                if a[1] != b[0] || a[1] == 0 {
                    return Err(format!("LoHa module `{name}`: {} and {} disagree on the rank", show(parts, ra), show(parts, rb)));
                }
            }
            halves([a1[0], b1[1]], [a2[0], b2[1]])?;
        }
        Some((t1, t2)) => {
            exactly_dims(parts, Role::HadaT1, 4)?;
            exactly_dims(parts, Role::HadaT2, 4)?;
            for (tc, a, b, rt, ra, rb) in [
                (t1, a1, b1, Role::HadaT1, Role::HadaW1A, Role::HadaW1B),
                (t2, a2, b2, Role::HadaT2, Role::HadaW2A, Role::HadaW2B),
            ] {
                if tc.dims()[0] != a[0] || tc.dims()[1] != b[0] {
                    return Err(format!(
                        "LoHa module `{name}`: the Tucker core {} does not match the ranks of {} and {} (with a core they are [rank, out] and [rank, in])",
                        show(parts, rt),
                        show(parts, ra),
                        show(parts, rb)
                    ));
                }
            }
            if t1.dims()[2..] != t2.dims()[2..] {
                return Err(format!("LoHa module `{name}`: the Tucker cores {} and {} have different kernels", show(parts, Role::HadaT1), show(parts, Role::HadaT2)));
            }
            halves([a1[1], b1[1]], [a2[1], b2[1]])?;
        }
    }
    Ok(AdapterWeights::Hadamard { w1a, w1b, w2a, w2b, t })
}

fn kronecker(name: &str, parts: &Parts) -> Result<AdapterWeights, String> {
    let half = |whole: Role, a: Role, b: Role, t: Option<Role>, label: &str| -> Result<KronHalf, String> {
        let (w, wa, wb, wt) = (get(parts, whole), get(parts, a), get(parts, b), t.and_then(|t| get(parts, t)));
        match (w, wa, wb) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(format!(
                "LoKr module `{name}` has its {label} half both whole ({}) and factorised ({})",
                show(parts, whole),
                present(parts, &[a, b])
            )),
            (Some(w), None, None) => {
                if let Some(t) = t.filter(|t| parts.contains_key(t)) {
                    return Err(format!("LoKr module `{name}`: the Tucker core {} needs `lokr_w2_a` and `lokr_w2_b`, not {}", show(parts, t), show(parts, whole)));
                }
                let max = if t.is_some() { 4 } else { 2 };
                if w.rank() != 2 && w.rank() != max {
                    return Err(format!("LoKr module `{name}`: {} must be a matrix{}", show(parts, whole), if max == 4 { " or a [b, d, k, k] kernel" } else { "" }));
                }
                Ok(KronHalf::Full(w))
            }
            (None, Some(wa), Some(wb)) => {
                exactly_dims(parts, a, 2)?;
                exactly_dims(parts, b, 2)?;
                match wt {
                    None => {
                        if wa.dims()[1] != wb.dims()[0] || wb.dims()[0] == 0 {
                            return Err(format!("LoKr module `{name}`: {} and {} disagree on the rank", show(parts, a), show(parts, b)));
                        }
                        Ok(KronHalf::Product { a: wa, b: wb })
                    }
                    Some(tc) => {
                        let t = t.expect("a core was found under a role");
                        exactly_dims(parts, t, 4)?;
                        if tc.dims()[0] != wa.dims()[0] || tc.dims()[1] != wb.dims()[0] {
                            return Err(format!(
                                "LoKr module `{name}`: the Tucker core {} does not match the ranks of {} and {} (with a core they are [rank, b] and [rank, d])",
                                show(parts, t),
                                show(parts, a),
                                show(parts, b)
                            ));
                        }
                        Ok(KronHalf::Tucker { t: tc, a: wa, b: wb })
                    }
                }
            }
            (None, Some(_), None) | (None, None, Some(_)) => Err(format!(
                "LoKr module `{name}` has {} but not both factors of its {label} half (`{}`, `{}`)",
                present(parts, &[a, b]),
                a.kohya_suffix(),
                b.kohya_suffix()
            )),
            (None, None, None) => Err(format!(
                "LoKr module `{name}` has {} but no {label} half (`{}`, or `{}` and `{}`)",
                present(parts, LOKR),
                whole.kohya_suffix(),
                a.kohya_suffix(),
                b.kohya_suffix()
            )),
        }
    };
    let w1 = half(Role::LokrW1, Role::LokrW1A, Role::LokrW1B, None, "first")?;
    let w2 = half(Role::LokrW2, Role::LokrW2A, Role::LokrW2B, Some(Role::LokrT2), "second")?;
    if let (Some(r1), Some(r2)) = (w1.rank(), w2.rank())
        && r1 != r2
    {
        return Err(format!(
            "LoKr module `{name}`: its factorised halves have ranks {r1} ({}) and {r2} ({}); alpha / rank needs one rank",
            show(parts, Role::LokrW1B),
            show(parts, Role::LokrW2B)
        ));
    }
    Ok(AdapterWeights::Kronecker { w1, w2 })
}

fn full(name: &str, parts: &Parts) -> Result<AdapterWeights, String> {
    dims_at_least(parts, &[Role::Diff], 2)?;
    exactly_dims(parts, Role::DiffBias, 1)?;
    let (diff, diff_b) = (get(parts, Role::Diff), get(parts, Role::DiffBias));
    if let (Some(d), Some(b)) = (&diff, &diff_b)
        && d.dims()[0] != b.dims()[0]
    {
        return Err(format!("module `{name}`: {} and {} disagree on the output width", show(parts, Role::Diff), show(parts, Role::DiffBias)));
    }
    Ok(AdapterWeights::Full { diff, diff_b })
}

fn dora(name: &str, parts: &Parts, weights: &AdapterWeights) -> Result<Option<Dora>, String> {
    let (role, (key, m)) = match (parts.get(&Role::DoraScale), parts.get(&Role::Magnitude)) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(format!("module `{name}` has two DoRA magnitudes, {} and {}", show(parts, Role::DoraScale), show(parts, Role::Magnitude)));
        }
        (Some(p), None) => (Role::DoraScale, p),
        (None, Some(p)) => (Role::Magnitude, p),
    };
    if weights.algorithm() == Algorithm::Full {
        return Err(format!("module `{name}`: a DoRA magnitude (`{key}`) cannot go with a full diff, which replaces the weight outright"));
    }
    let d = m.dims();
    let ones = |s: &[usize]| s.iter().all(|&x| x == 1);
    let axis = match role {
        // kohya and LyCORIS keep the norm's axes: [out, 1, …] per output, [1, in, …] per input.
        Role::DoraScale if d.len() == 1 => Some(DoraAxis::Output),
        Role::DoraScale if d.len() >= 2 && ones(&d[1..]) => Some(DoraAxis::Output),
        Role::DoraScale if d.len() >= 2 && d[0] == 1 && ones(&d[2..]) => Some(DoraAxis::Input),
        // PEFT: [out] for linear layers, [1, out, 1, 1] for convolutions; always per output.
        Role::Magnitude if d.len() == 1 => Some(DoraAxis::Output),
        Role::Magnitude if d.len() >= 2 && d[0] == 1 && ones(&d[2..]) => Some(DoraAxis::Output),
        _ => None,
    };
    let Some(axis) = axis else {
        let want = if role == Role::DoraScale { "[out, 1, …] or [1, in, …]" } else { "[out] or [1, out, 1, 1]" };
        return Err(format!("DoRA magnitude `{key}` has shape {d:?}, expected {want}"));
    };
    Ok(Some(Dora { magnitude: m.flatten_all().map_err(|e| e.to_string())?, axis }))
}
