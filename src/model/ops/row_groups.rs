//! A batch's rows in two groups that run at once, one per thread, for inference on the CPU.
//!
//! The fused kernels split each operation over the threads, and every split ends in a wait:
//! at tiny-sd's sizes a UNet call makes hundreds of them, and on two cores the second thread
//! idles for about a sixth of the call. Two half batches run side by side keep both threads
//! busy with whole layers; the kernels' own splits still let an idle thread help the other.
//! Every row of these models is computed independently of the others (no batch statistics),
//! so the result is that of one call on the whole batch, up to float rounding (a product
//! of another size may sum in another order).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Which rows of a batch each of the two groups takes, and how to put their results back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGroups {
    first: Vec<u32>,
    second: Vec<u32>,
}

impl RowGroups {
    /// Two groups of `rows` rows (`None` below two rows). With `paired` and an even batch of at
    /// least four rows, row `i` and row `i + rows/2` stay in the same group, each group keeping
    /// the pairing in its own halves: classifier-free guidance stacks each latent's
    /// unconditional and conditional rows that way, and the UNet shares work between a pair.
    pub fn split(rows: usize, paired: bool) -> Option<RowGroups> {
        if rows < 2 {
            return None;
        }
        let rows = rows as u32;
        if paired && rows.is_multiple_of(2) && rows >= 4 {
            let pairs = rows / 2;
            let cut = pairs.div_ceil(2);
            let group = |from: u32, to: u32| (from..to).chain(pairs + from..pairs + to).collect();
            return Some(RowGroups { first: group(0, cut), second: group(cut, pairs) });
        }
        let cut = rows.div_ceil(2);
        Some(RowGroups { first: (0..cut).collect(), second: (cut..rows).collect() })
    }

    /// `t`'s rows (dimension 0) of group `group` (0 or 1), in that group's order.
    pub fn select(&self, group: usize, t: &Tensor) -> Result<Tensor> {
        let rows = if group == 0 { &self.first } else { &self.second };
        let contiguous = rows.windows(2).all(|w| w[1] == w[0] + 1);
        if contiguous {
            return Ok(t.narrow(0, rows[0] as usize, rows.len())?);
        }
        Ok(t.index_select(&Tensor::new(rows.as_slice(), t.device())?, 0)?)
    }

    /// The two groups' results (dimension 0 in each group's order) back in the batch's order.
    pub fn merge(&self, first: &Tensor, second: &Tensor) -> Result<Tensor> {
        let both = Tensor::cat(&[first, second], 0)?;
        let mut position = vec![0u32; self.first.len() + self.second.len()];
        for (at, &row) in self.first.iter().chain(&self.second).enumerate() {
            position[row as usize] = at as u32;
        }
        if position.iter().enumerate().all(|(i, &p)| p as usize == i) {
            return Ok(both);
        }
        Ok(both.index_select(&Tensor::new(position.as_slice(), both.device())?, 0)?)
    }
}

/// One group's view of the batch inside [`in_row_groups`]: which group it is, and its rows of
/// any batch-major tensor.
#[derive(Clone, Copy)]
pub struct Group<'a> {
    groups: Option<&'a RowGroups>,
    index: usize,
}

impl Group<'_> {
    /// 0 or 1; 0 also when the batch runs whole.
    pub fn index(&self) -> usize {
        self.index
    }

    /// `t`'s rows (dimension 0) of this group, in the group's order (all of `t` when whole).
    pub fn select(&self, t: &Tensor) -> Result<Tensor> {
        match self.groups {
            Some(g) => g.select(self.index, t),
            None => Ok(t.clone()),
        }
    }
}

/// Whether work on `device` takes the fused CPU kernels, whose per-operation splits row groups
/// avoid (other devices, and the generic path that proves CUDA's on the CPU, run batches whole).
pub fn on_fused_cpu(device: &Device) -> bool {
    device.is_cpu() && !crate::model::ops::generic_ops()
}

/// Runs `f` on `rows` rows as two groups at once when that pays (on the fused CPU path, with at
/// least two threads and two rows) and merges the results; otherwise `f` runs once on the whole
/// batch.
pub fn in_row_groups(rows: usize, paired: bool, device: &Device, f: impl Fn(Group<'_>) -> Result<Tensor> + Sync) -> Result<Tensor> {
    let groups = RowGroups::split(rows, paired).filter(|_| on_fused_cpu(device) && rayon::current_num_threads() >= 2);
    let Some(groups) = groups else {
        return f(Group { groups: None, index: 0 });
    };
    let run = |index: usize| f(Group { groups: Some(&groups), index });
    let (first, second) = rayon::join(|| run(0), || run(1));
    groups.merge(&first?, &second?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn guided_pairs_stay_together_and_every_row_is_taken_once() {
        let g = RowGroups::split(8, true).unwrap();
        assert_eq!((g.first.as_slice(), g.second.as_slice()), (&[0, 1, 4, 5][..], &[2, 3, 6, 7][..]));
        let g = RowGroups::split(6, true).unwrap();
        assert_eq!((g.first.as_slice(), g.second.as_slice()), (&[0, 1, 3, 4][..], &[2, 5][..]));
        // One pair cannot be split by pairs: its rows go one to a group.
        let g = RowGroups::split(2, true).unwrap();
        assert_eq!((g.first.as_slice(), g.second.as_slice()), (&[0][..], &[1][..]));
        let g = RowGroups::split(5, false).unwrap();
        assert_eq!((g.first.as_slice(), g.second.as_slice()), (&[0, 1, 2][..], &[3, 4][..]));
        assert_eq!(RowGroups::split(1, true), None);
        assert_eq!(RowGroups::split(0, false), None);
    }

    #[test]
    fn select_then_merge_restores_the_batch_order() {
        for (rows, paired) in [(8, true), (6, true), (12, true), (2, true), (5, false), (7, true)] {
            let t = Tensor::arange(0f32, rows as f32 * 3.0, &Device::Cpu).unwrap().reshape((rows, 3)).unwrap();
            let g = RowGroups::split(rows, paired).unwrap();
            let (a, b) = (g.select(0, &t).unwrap(), g.select(1, &t).unwrap());
            assert_eq!(a.dim(0).unwrap() + b.dim(0).unwrap(), rows);
            assert_eq!(rows_of(&g.merge(&a, &b).unwrap()), rows_of(&t), "{rows} rows, paired {paired}");
        }
    }

    #[test]
    fn in_row_groups_runs_each_group_through_f_and_keeps_row_order() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let t = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        // Each group's rows get their group's size (and 100 × its index) added: proof that f saw
        // only its rows, and knew which group they were.
        let out = pool
            .install(|| {
                in_row_groups(8, true, &Device::Cpu, |group| {
                    calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mine = group.select(&t)?;
                    let tag = (mine.dim(0)? + 100 * group.index()) as f32;
                    Ok((mine * 10.0)?.broadcast_add(&Tensor::new(&[tag], &Device::Cpu)?)?)
                })
            })
            .unwrap();
        assert_eq!(calls.into_inner(), 2);
        let second = [2, 3, 6, 7];
        let want: Vec<f32> = (0..8).map(|i| i as f32 * 10.0 + if second.contains(&i) { 104.0 } else { 4.0 }).collect();
        assert_eq!(rows_of(&out), want);
        // One thread: one call on the whole batch. (The generic path's switch is process-wide;
        // the parity tests run the grouped calls on both paths under their lock.)
        let whole_batch = |g: Group<'_>| -> Result<Tensor> { Ok(Tensor::new(&[g.select(&t)?.dim(0)? as f32, g.index() as f32], &Device::Cpu)?) };
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(rows_of(&single.install(|| in_row_groups(8, true, &Device::Cpu, whole_batch)).unwrap()), vec![8.0, 0.0]);
    }
}
