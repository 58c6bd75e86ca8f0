//! Scoring recovered labels against a private batch's labels as a multiset.
//!
//! An attack on a batch (or on an aggregate of several clients' batches) recovers labels that need
//! not sit on the right images: label counts carry no order at all, and when the reconstructed images
//! are poor their matching to the private images ([`crate::match_batch`]) is close to arbitrary, so
//! "the label of the private image this reconstruction was matched to" would count a leaked label as
//! wrong merely because it sits on the wrong reconstruction. What leaked is which labels the batch
//! holds: each recovered label is correct when it claims a private label of the same class that no
//! other recovered label has claimed. A row's own matched private image is claimed first, so a batch
//! whose labels all sit on the right images scores exactly as a per-image comparison would, and the
//! number of correct labels is always the size of the multiset intersection.

use crate::Matching;

/// One recovered label to score: the label (`None` when the attack recovered none for this row) and
/// the index of the private image the row was matched to, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredLabel {
    /// The recovered label.
    pub label: Option<u32>,
    /// Index into the private labels of the row's matched private image.
    pub matched: Option<usize>,
}

/// Scores `recovered` labels against the private batch's labels `truth`: `Some(true)` for a label
/// that claims an unclaimed private label of its class (its own matched image's first), `Some(false)`
/// for one that finds none left, `None` for a row without a label. The number of `Some(true)` is the
/// size of the multiset intersection of recovered and private labels.
///
/// A `matched` index outside `truth` is ignored (the row then claims any private label of its class).
///
/// # Example
/// ```
/// use fedleak_metrics::{score_labels, RecoveredLabel};
///
/// // Three private images labelled 0, 1, 1; the attack put label 1 on the reconstruction matched to
/// // image 0 and labels 0, 0 on the other two: two of its three labels are in the batch.
/// let row = |label, matched| RecoveredLabel { label: Some(label), matched: Some(matched) };
/// let scored = score_labels(&[row(1, 0), row(0, 1), row(0, 2)], &[0, 1, 1]);
/// assert_eq!(scored, vec![Some(true), Some(true), Some(false)]);
/// ```
pub fn score_labels(recovered: &[RecoveredLabel], truth: &[u32]) -> Vec<Option<bool>> {
    let mut claimed = vec![false; truth.len()];
    let mut scored: Vec<Option<bool>> = vec![None; recovered.len()];
    // First every row whose own matched image carries its label, then the rest in row order.
    for (row, entry) in recovered.iter().enumerate() {
        if let (Some(label), Some(at)) = (entry.label, entry.matched) {
            if truth.get(at) == Some(&label) && !claimed[at] {
                claimed[at] = true;
                scored[row] = Some(true);
            }
        }
    }
    for (row, entry) in recovered.iter().enumerate() {
        let Some(label) = entry.label else { continue };
        if scored[row].is_some() {
            continue;
        }
        let free = (0..truth.len()).find(|&at| !claimed[at] && truth[at] == label);
        if let Some(at) = free {
            claimed[at] = true;
        }
        scored[row] = Some(free.is_some());
    }
    scored
}

/// [`score_labels`] for the pairs of a [`Matching`]: `recovered[j]` is the label the attack gave
/// reconstruction `j` (`None`, or an index past the end: no label); one score per pair, in the
/// matching's order.
pub fn score_matched_labels(
    matching: &Matching,
    recovered: &[Option<u32>],
    truth: &[u32],
) -> Vec<Option<bool>> {
    let rows: Vec<RecoveredLabel> = matching
        .pairs
        .iter()
        .map(|pair| RecoveredLabel {
            label: recovered.get(pair.reconstruction).copied().flatten(),
            matched: Some(pair.reference),
        })
        .collect();
    score_labels(&rows, truth)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(labels: &[Option<u32>]) -> Vec<RecoveredLabel> {
        labels
            .iter()
            .enumerate()
            .map(|(i, &label)| RecoveredLabel {
                label,
                matched: Some(i),
            })
            .collect()
    }

    #[test]
    fn labels_on_their_own_images_score_as_a_per_image_comparison() {
        let scored = score_labels(&rows(&[Some(0), Some(1), Some(1)]), &[0, 1, 0]);
        assert_eq!(scored, vec![Some(true), Some(true), Some(false)]);
    }

    #[test]
    fn correct_labels_count_the_multiset_intersection_whatever_the_order() {
        // Recovered {1, 1, 0, 2} against private {0, 1, 2, 2}: intersection {0, 1, 2}.
        let recovered = [Some(1), Some(1), Some(0), Some(2)];
        let truth = [0, 1, 2, 2];
        for shift in 0..4 {
            let mut rotated = recovered;
            rotated.rotate_left(shift);
            let hits = score_labels(&rows(&rotated), &truth)
                .iter()
                .filter(|s| **s == Some(true))
                .count();
            assert_eq!(hits, 3, "rotation {shift}");
        }
    }

    #[test]
    fn a_row_without_a_label_or_a_match_is_handled() {
        let recovered = [
            RecoveredLabel {
                label: None,
                matched: Some(0),
            },
            RecoveredLabel {
                label: Some(0),
                matched: None,
            },
            RecoveredLabel {
                label: Some(0),
                matched: Some(7),
            },
        ];
        assert_eq!(
            score_labels(&recovered, &[0, 1]),
            vec![None, Some(true), Some(false)]
        );
    }

    #[test]
    fn matched_labels_are_read_by_reconstruction_index() {
        let dims = crate::ImageDims::new(1, 11, 11);
        let (black, white) = (vec![0.0_f32; 121], vec![1.0_f32; 121]);
        let references: [&[f32]; 2] = [&black, &white];
        let reconstructions: [&[f32]; 3] = [&white, &black, &black];
        let matching = crate::match_batch(&references, &reconstructions, dims).unwrap();
        // Reference 0 (black, label 0) pairs with reconstruction 1, reference 1 (white, label 1)
        // with reconstruction 0; reconstruction 2 stays unmatched.
        let per_pair =
            |recovered: &[Option<u32>]| score_matched_labels(&matching, recovered, &[0, 1]);
        assert_eq!(
            per_pair(&[Some(1), Some(0), Some(1)]),
            vec![Some(true), Some(true)]
        );
        assert_eq!(
            per_pair(&[Some(0), Some(1), None]),
            vec![Some(true), Some(true)]
        );
        assert_eq!(per_pair(&[Some(0), Some(0)]), vec![Some(true), Some(false)]);
        assert_eq!(per_pair(&[None]), vec![None, None]);
    }

    #[test]
    fn a_row_on_its_own_image_keeps_it_from_an_earlier_row() {
        // Row 0 (matched to image 1) and row 1 (matched to image 0, label 0) both carry label 0; row
        // 1's own image is claimed first, so row 0 finds no other 0.
        let recovered = [
            RecoveredLabel {
                label: Some(0),
                matched: Some(1),
            },
            RecoveredLabel {
                label: Some(0),
                matched: Some(0),
            },
        ];
        assert_eq!(
            score_labels(&recovered, &[0, 1]),
            vec![Some(false), Some(true)]
        );
    }
}
