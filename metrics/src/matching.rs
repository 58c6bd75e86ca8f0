//! Optimal one-to-one matching of a batch of reconstructions to the private batch they came from.
//!
//! A gradient-inversion attack on a batch returns its reconstructions in no particular order. Scoring
//! each private image against its *best* reconstruction ("best of N") would let one good reconstruction
//! count several times and overstate leakage; instead every reconstruction is used at most once, by the
//! assignment that minimises the total mean squared error between matched pairs, found with the
//! Hungarian (Kuhn-Munkres) algorithm in O(n^3) (Kuhn 1955; Munkres 1957; the shortest-augmenting-path
//! form with potentials of Jonker & Volgenant 1987). Batches may differ in size: `min(n, m)` pairs are
//! formed and the rest stay unmatched.
//!
//! This module knows nothing about attacks or ML: only images, their dims and a cost matrix.

use crate::dims::{check_dims, checked_image, ImageDims, Pixel};
use crate::error::{ImageRole, MetricsError};
use crate::psnr::mse_checked;
use crate::ssim::{check_window_fits, SSIM_WANG_WINDOW};
use crate::{score_checked, Score};

/// One matched (private image, reconstruction) pair and its metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchedPair {
    /// Index of the private image in the reference batch.
    pub reference: usize,
    /// Index of the reconstruction in the reconstruction batch.
    pub reconstruction: usize,
    /// Mean squared error of the pair: its share of the cost the matching minimises.
    pub mse: f64,
    /// All metrics of the pair.
    pub score: Score,
}

/// Result of [`match_batch`]: the optimal one-to-one pairs, ordered by reference index.
#[derive(Debug, Clone, PartialEq)]
pub struct Matching {
    /// `min(n, m)` pairs; no reference and no reconstruction index appears twice.
    pub pairs: Vec<MatchedPair>,
    /// Sum of the pairs' MSE: the minimum over all one-to-one assignments.
    pub total_mse: f64,
}

/// Matches `reconstructions` to `references` one-to-one, minimising the total MSE (over all pixels and
/// channels, data range 1) of the matched pairs, then scores every pair with [`crate::score_pair`].
///
/// With `n` references and `m` reconstructions, `min(n, m)` pairs are returned; each reconstruction is
/// used at most once, so a batch is never scored "best of N". Costs `n * m` MSE evaluations plus
/// O(max(n, m)^3) for the assignment.
///
/// # Errors
/// [`MetricsError::EmptyDims`] or [`MetricsError::ImageTooSmall`] (below 11x11) for bad `dims`;
/// [`MetricsError::InBatch`] naming the batch and index of an image of the wrong length or with a
/// non-finite value.
///
/// # Example
/// ```
/// use fedleak_metrics::{match_batch, ImageDims};
///
/// let dims = ImageDims::new(1, 11, 11);
/// let (black, grey, white) = (vec![0.0_f32; 121], vec![0.5_f32; 121], vec![1.0_f32; 121]);
/// let references: [&[f32]; 2] = [&black, &white];
/// // The attack returned white first, plus a grey decoy.
/// let reconstructions: [&[f32]; 3] = [&white, &grey, &black];
/// let matching = match_batch(&references, &reconstructions, dims)?;
/// let pairs: Vec<(usize, usize)> =
///     matching.pairs.iter().map(|p| (p.reference, p.reconstruction)).collect();
/// assert_eq!(pairs, vec![(0, 2), (1, 0)]);
/// assert_eq!(matching.total_mse, 0.0);
/// assert_eq!(matching.pairs[0].score.psnr_db, f64::INFINITY);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn match_batch<T: Pixel>(
    references: &[&[T]],
    reconstructions: &[&[T]],
    dims: ImageDims,
) -> Result<Matching, MetricsError> {
    check_dims(dims)?;
    check_window_fits(SSIM_WANG_WINDOW, dims)?;
    let references = checked_batch(references, dims, ImageRole::Reference)?;
    let reconstructions = checked_batch(reconstructions, dims, ImageRole::Test)?;

    let cols = reconstructions.len();
    let costs: Vec<f64> = references
        .iter()
        .flat_map(|r| reconstructions.iter().map(move |t| mse_checked(r, t)))
        .collect();
    let assignment = assign_min_cost(&costs, references.len(), cols)?;

    let pairs: Vec<MatchedPair> = assignment
        .into_iter()
        .map(|(reference, reconstruction)| MatchedPair {
            reference,
            reconstruction,
            mse: costs[reference * cols + reconstruction],
            score: score_checked(
                &references[reference],
                &reconstructions[reconstruction],
                dims,
            ),
        })
        .collect();
    let total_mse = pairs.iter().map(|p| p.mse).sum();
    Ok(Matching { pairs, total_mse })
}

fn checked_batch<T: Pixel>(
    batch: &[&[T]],
    dims: ImageDims,
    role: ImageRole,
) -> Result<Vec<Vec<f64>>, MetricsError> {
    batch
        .iter()
        .enumerate()
        .map(|(index, image)| {
            checked_image(image, dims, role).map_err(|source| MetricsError::InBatch {
                role,
                index,
                source: Box::new(source),
            })
        })
        .collect()
}

/// Solves the rectangular assignment problem: picks `min(rows, cols)` entries of the row-major
/// `rows x cols` cost matrix, at most one per row and per column, with the smallest total cost
/// (Hungarian algorithm, O(max(rows, cols)^3)). Returns `(row, col)` pairs ordered by row.
///
/// # Errors
/// [`MetricsError::CostShapeMismatch`] if `costs.len() != rows * cols`,
/// [`MetricsError::NonFiniteCost`] for a NaN or infinite entry.
///
/// # Example
/// ```
/// use fedleak_metrics::assign_min_cost;
///
/// // Greedy takes the 0 at (1, 1) and ends at 0 + 2 + 4 = 6; the optimum is 1 + 2 + 2 = 5.
/// let costs = [
///     4.0, 1.0, 3.0, //
///     2.0, 0.0, 5.0, //
///     3.0, 2.0, 2.0,
/// ];
/// assert_eq!(assign_min_cost(&costs, 3, 3)?, vec![(0, 1), (1, 0), (2, 2)]);
/// // Two rows, three columns: column 1 stays unused.
/// assert_eq!(assign_min_cost(&[0.0, 5.0, 9.0, 9.0, 5.0, 1.0], 2, 3)?, vec![(0, 0), (1, 2)]);
/// # Ok::<(), fedleak_metrics::MetricsError>(())
/// ```
pub fn assign_min_cost(
    costs: &[f64],
    rows: usize,
    cols: usize,
) -> Result<Vec<(usize, usize)>, MetricsError> {
    let expected = rows * cols;
    if costs.len() != expected {
        return Err(MetricsError::CostShapeMismatch {
            rows,
            cols,
            expected,
            got: costs.len(),
        });
    }
    if let Some(index) = costs.iter().position(|c| !c.is_finite()) {
        return Err(MetricsError::NonFiniteCost {
            row: index / cols,
            col: index % cols,
            value: costs[index],
        });
    }
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    let mut pairs = if rows <= cols {
        hungarian_wide(rows, cols, |r, c| costs[r * cols + c])
    } else {
        // Solve the transpose (one row per column) and swap back.
        hungarian_wide(cols, rows, |r, c| costs[c * cols + r])
            .into_iter()
            .map(|(c, r)| (r, c))
            .collect()
    };
    pairs.sort_unstable();
    Ok(pairs)
}

/// Hungarian algorithm with row/column potentials for `rows <= cols` and finite costs; every row is
/// assigned. Rows are added one at a time, each by a shortest augmenting path (Dijkstra on reduced
/// costs), so the total is O(rows^2 * cols).
fn hungarian_wide(
    rows: usize,
    cols: usize,
    cost: impl Fn(usize, usize) -> f64,
) -> Vec<(usize, usize)> {
    debug_assert!(
        rows <= cols,
        "hungarian_wide needs rows <= cols, got {rows} > {cols}"
    );
    // 1-based with a virtual column 0; `row_of[j]` is the row (1-based, 0 = none) holding column j.
    let mut row_potential = vec![0.0_f64; rows + 1];
    let mut col_potential = vec![0.0_f64; cols + 1];
    let mut row_of = vec![0_usize; cols + 1];
    let mut previous_col = vec![0_usize; cols + 1];
    for row in 1..=rows {
        row_of[0] = row;
        let mut current_col = 0;
        let mut min_slack = vec![f64::INFINITY; cols + 1];
        let mut visited = vec![false; cols + 1];
        loop {
            visited[current_col] = true;
            let current_row = row_of[current_col];
            let mut delta = f64::INFINITY;
            let mut next_col = 0;
            for col in 1..=cols {
                if visited[col] {
                    continue;
                }
                let reduced = cost(current_row - 1, col - 1)
                    - row_potential[current_row]
                    - col_potential[col];
                if reduced < min_slack[col] {
                    min_slack[col] = reduced;
                    previous_col[col] = current_col;
                }
                if min_slack[col] < delta {
                    delta = min_slack[col];
                    next_col = col;
                }
            }
            // rows <= cols and finite costs guarantee an unvisited column with finite slack.
            debug_assert!(next_col != 0, "no augmenting column found for row {row}");
            for col in 0..=cols {
                if visited[col] {
                    row_potential[row_of[col]] += delta;
                    col_potential[col] -= delta;
                } else {
                    min_slack[col] -= delta;
                }
            }
            current_col = next_col;
            if row_of[current_col] == 0 {
                break;
            }
        }
        // Flip the augmenting path back to the virtual column.
        while current_col != 0 {
            let prev = previous_col[current_col];
            row_of[current_col] = row_of[prev];
            current_col = prev;
        }
    }
    (1..=cols)
        .filter(|&col| row_of[col] != 0)
        .map(|col| (row_of[col] - 1, col - 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimum total cost over all injective maps rows -> cols (rows <= cols), by enumeration.
    fn brute_force_min(costs: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(costs: &[f64], rows: usize, cols: usize, row: usize, used: &mut [bool]) -> f64 {
            if row == rows {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for col in 0..cols {
                if !used[col] {
                    used[col] = true;
                    let total = costs[row * cols + col] + go(costs, rows, cols, row + 1, used);
                    best = best.min(total);
                    used[col] = false;
                }
            }
            best
        }
        go(costs, rows, cols, 0, &mut vec![false; cols])
    }

    /// splitmix64 in [0, 1): a fixed, dependency-free generator.
    fn uniform_costs(seed: u64, len: usize) -> Vec<f64> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    fn check_against_brute_force(rows: usize, cols: usize, seeds: std::ops::Range<u64>) {
        for seed in seeds {
            let costs = uniform_costs(seed, rows * cols);
            let pairs = assign_min_cost(&costs, rows, cols).unwrap();
            assert_eq!(pairs.len(), rows.min(cols));
            let mut seen_rows = vec![false; rows];
            let mut seen_cols = vec![false; cols];
            for &(r, c) in &pairs {
                assert!(
                    !seen_rows[r] && !seen_cols[c],
                    "seed {seed}: {pairs:?} reuses an index"
                );
                seen_rows[r] = true;
                seen_cols[c] = true;
            }
            let total: f64 = pairs.iter().map(|&(r, c)| costs[r * cols + c]).sum();
            let best = if rows <= cols {
                brute_force_min(&costs, rows, cols)
            } else {
                let transposed: Vec<f64> = (0..cols * rows)
                    .map(|i| costs[(i % rows) * cols + i / rows])
                    .collect();
                brute_force_min(&transposed, cols, rows)
            };
            assert!(
                (total - best).abs() < 1e-12,
                "seed {seed}, {rows}x{cols}: hungarian {total} vs brute force {best}"
            );
        }
    }

    #[test]
    fn hungarian_equals_brute_force_square_5x5() {
        check_against_brute_force(5, 5, 0..200);
    }

    #[test]
    fn hungarian_equals_brute_force_wide_4x6() {
        check_against_brute_force(4, 6, 200..400);
    }

    #[test]
    fn hungarian_equals_brute_force_tall_6x4() {
        check_against_brute_force(6, 4, 400..600);
    }

    #[test]
    fn hungarian_handles_ties_and_negative_costs() {
        check_against_brute_force(1, 1, 0..3);
        let costs = [-1.0, -1.0, -1.0, -1.0];
        assert_eq!(assign_min_cost(&costs, 2, 2).unwrap().len(), 2);
    }

    #[test]
    fn empty_sides_give_no_pairs() {
        assert_eq!(assign_min_cost(&[], 0, 4).unwrap(), vec![]);
        assert_eq!(assign_min_cost(&[], 3, 0).unwrap(), vec![]);
    }

    #[test]
    fn cost_errors_name_shape_and_entry() {
        assert_eq!(
            assign_min_cost(&[0.0; 5], 2, 3).unwrap_err(),
            MetricsError::CostShapeMismatch {
                rows: 2,
                cols: 3,
                expected: 6,
                got: 5
            }
        );
        let err = assign_min_cost(&[0.0, 1.0, f64::NAN, 2.0], 2, 2).unwrap_err();
        assert!(matches!(
            err,
            MetricsError::NonFiniteCost { row: 1, col: 0, .. }
        ));
    }

    #[test]
    fn batch_error_names_the_image() {
        let dims = ImageDims::new(1, 11, 11);
        let good = vec![0.0_f64; dims.len()];
        let short = [0.0_f64; 10];
        let err = match_batch(&[&good[..]], &[&good[..], &short[..]], dims).unwrap_err();
        assert_eq!(
            err,
            MetricsError::InBatch {
                role: ImageRole::Test,
                index: 1,
                source: Box::new(MetricsError::LengthMismatch {
                    role: ImageRole::Test,
                    dims,
                    expected: 121,
                    got: 10
                }),
            }
        );
    }
}
