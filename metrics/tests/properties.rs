//! Property tests of the metrics: identity, symmetry, monotonicity under added Gaussian noise, and
//! batch matching that undoes a shuffle. Noise comes from a fixed, dependency-free generator.

use fedleak_metrics::{
    match_batch, nmi, nmi_studholme, psnr_db, score_pair, ssim, ssim_skimage, ImageDims,
};

const DIMS: ImageDims = ImageDims::new(3, 24, 20);

/// splitmix64 with Box-Muller: deterministic standard normal samples.
struct Gaussian {
    state: u64,
}

impl Gaussian {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn next_normal(&mut self) -> f64 {
        let (u1, u2) = (self.next_unit(), self.next_unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn normals(&mut self, len: usize) -> Vec<f64> {
        (0..len).map(|_| self.next_normal()).collect()
    }
}

/// A smooth synthetic planar image in [0, 1], different per `variant`.
fn synthetic_image(dims: ImageDims, variant: usize) -> Vec<f64> {
    let phase = variant as f64 * 0.9;
    (0..dims.len())
        .map(|i| {
            let c = i / dims.plane_len();
            let y = (i % dims.plane_len()) / dims.width;
            let x = i % dims.width;
            let v = 0.5
                + 0.3 * ((x as f64 * 0.35 + phase).sin() * (y as f64 * 0.25 - phase).cos())
                + 0.1 * c as f64 / dims.channels as f64
                + 0.05 * (variant % 3) as f64;
            v.clamp(0.0, 1.0)
        })
        .collect()
}

fn add_noise(image: &[f64], noise: &[f64], sigma: f64) -> Vec<f64> {
    image
        .iter()
        .zip(noise)
        .map(|(v, n)| v + sigma * n)
        .collect()
}

#[test]
fn identity_gives_the_maximum_of_every_metric() {
    for variant in 0..3 {
        let image = synthetic_image(DIMS, variant);
        let score = score_pair(&image, &image, DIMS).unwrap();
        assert_eq!(score.psnr_db, f64::INFINITY);
        assert_eq!(score.ssim, 1.0);
        assert_eq!(score.ssim_skimage, 1.0);
        assert!((score.nmi_studholme - 2.0).abs() < 1e-12, "{score:?}");
        assert!((score.nmi - 1.0).abs() < 1e-12, "{score:?}");
    }
}

#[test]
fn f32_and_f64_inputs_agree() {
    let image = synthetic_image(DIMS, 1);
    let noisy = add_noise(&image, &Gaussian::new(3).normals(DIMS.len()), 0.05);
    let image32: Vec<f32> = image.iter().map(|&v| v as f32).collect();
    let noisy32: Vec<f32> = noisy.iter().map(|&v| v as f32).collect();
    let a = score_pair(&image, &noisy, DIMS).unwrap();
    let b = score_pair(&image32, &noisy32, DIMS).unwrap();
    assert!((a.psnr_db - b.psnr_db).abs() < 1e-4, "{a:?} vs {b:?}");
    assert!((a.ssim - b.ssim).abs() < 1e-5, "{a:?} vs {b:?}");
    assert!(
        (a.ssim_skimage - b.ssim_skimage).abs() < 1e-5,
        "{a:?} vs {b:?}"
    );
}

#[test]
fn psnr_ssim_and_nmi_are_symmetric() {
    let a = synthetic_image(DIMS, 0);
    let b = add_noise(
        &synthetic_image(DIMS, 2),
        &Gaussian::new(11).normals(DIMS.len()),
        0.08,
    );
    assert_eq!(
        psnr_db(&a, &b, DIMS).unwrap(),
        psnr_db(&b, &a, DIMS).unwrap()
    );
    // The SSIM formula is symmetric term by term, so even the rounding is.
    assert_eq!(ssim(&a, &b, DIMS).unwrap(), ssim(&b, &a, DIMS).unwrap());
    assert_eq!(
        ssim_skimage(&a, &b, DIMS).unwrap(),
        ssim_skimage(&b, &a, DIMS).unwrap()
    );
    // The joint histogram is transposed, so only the summation order of H(A,B) changes.
    let ab = nmi_studholme(&a, &b, DIMS).unwrap();
    let ba = nmi_studholme(&b, &a, DIMS).unwrap();
    assert!((ab - ba).abs() < 1e-12, "{ab} vs {ba}");
    assert!((nmi(&a, &b, DIMS).unwrap() - (ab - 1.0)).abs() < 1e-15);
    assert!((1.0..=2.0).contains(&ab), "{ab}");
}

#[test]
fn more_noise_lowers_psnr_and_ssim() {
    let image = synthetic_image(DIMS, 1);
    let noise = Gaussian::new(42).normals(DIMS.len());
    let sigmas = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4];
    let scores: Vec<_> = sigmas
        .iter()
        .map(|&sigma| score_pair(&image, &add_noise(&image, &noise, sigma), DIMS).unwrap())
        .collect();
    for (pair, sigma) in scores.windows(2).zip(sigmas.windows(2)) {
        let (less, more) = (pair[0], pair[1]);
        assert!(
            more.psnr_db < less.psnr_db,
            "psnr at sigma {sigma:?}: {less:?} -> {more:?}"
        );
        assert!(
            more.ssim < less.ssim,
            "ssim at sigma {sigma:?}: {less:?} -> {more:?}"
        );
        assert!(
            more.ssim_skimage < less.ssim_skimage,
            "ssim_skimage at sigma {sigma:?}: {less:?} -> {more:?}"
        );
    }
    // Same noise pattern scaled by 2 -> MSE x 4 -> PSNR drops by 10 log10 4 dB.
    let drop = scores[1].psnr_db - scores[2].psnr_db;
    assert!((drop - 10.0 * 4.0_f64.log10()).abs() < 1e-9, "drop {drop}");
}

/// Fisher-Yates with the test generator.
fn permutation(len: usize, seed: u64) -> Vec<usize> {
    let mut rng = Gaussian::new(seed);
    let mut perm: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

#[test]
fn shuffled_batch_is_matched_back_to_its_permutation() {
    let dims = ImageDims::new(3, 16, 16);
    let references: Vec<Vec<f64>> = (0..6).map(|v| synthetic_image(dims, v)).collect();
    let perm = permutation(references.len(), 7);
    assert_ne!(
        perm,
        (0..references.len()).collect::<Vec<_>>(),
        "seed gives the identity"
    );
    // Reconstruction slot k holds a noisy copy of reference perm[k].
    let mut noise = Gaussian::new(99);
    let reconstructions: Vec<Vec<f64>> = perm
        .iter()
        .map(|&r| add_noise(&references[r], &noise.normals(dims.len()), 0.05))
        .collect();
    let refs: Vec<&[f64]> = references.iter().map(Vec::as_slice).collect();
    let recs: Vec<&[f64]> = reconstructions.iter().map(Vec::as_slice).collect();
    let matching = match_batch(&refs, &recs, dims).unwrap();
    let got: Vec<(usize, usize)> = matching
        .pairs
        .iter()
        .map(|p| (p.reference, p.reconstruction))
        .collect();
    let mut want: Vec<(usize, usize)> = perm.iter().enumerate().map(|(k, &r)| (r, k)).collect();
    want.sort_unstable();
    assert_eq!(got, want);
    for pair in &matching.pairs {
        let direct = score_pair(refs[pair.reference], recs[pair.reconstruction], dims).unwrap();
        assert_eq!(pair.score, direct);
    }
    let total: f64 = matching.pairs.iter().map(|p| p.mse).sum();
    assert_eq!(matching.total_mse, total);
}

#[test]
fn rectangular_batches_use_each_image_at_most_once() {
    let dims = ImageDims::new(1, 12, 12);
    let references: Vec<Vec<f64>> = (0..3).map(|v| synthetic_image(dims, v)).collect();
    let refs: Vec<&[f64]> = references.iter().map(Vec::as_slice).collect();
    // Two copies of reference 1 and one of reference 0: best-of-N would score reference 1 twice.
    let recs: Vec<&[f64]> = vec![refs[1], refs[1], refs[0]];
    let matching = match_batch(&refs, &recs, dims).unwrap();
    assert_eq!(matching.pairs.len(), 3);
    let mut used: Vec<usize> = matching.pairs.iter().map(|p| p.reconstruction).collect();
    used.sort_unstable();
    assert_eq!(used, vec![0, 1, 2]);
    let exact = matching
        .pairs
        .iter()
        .filter(|p| p.score.psnr_db.is_infinite())
        .count();
    assert_eq!(exact, 2, "{:?}", matching.pairs);
    let reference2 = matching.pairs.iter().find(|p| p.reference == 2).unwrap();
    assert!(reference2.score.psnr_db.is_finite());

    // More references than reconstructions: min(n, m) pairs.
    let matching = match_batch(&refs, &refs[2..], dims).unwrap();
    let pairs: Vec<(usize, usize)> = matching
        .pairs
        .iter()
        .map(|p| (p.reference, p.reconstruction))
        .collect();
    assert_eq!(pairs, vec![(2, 0)]);
    assert!(match_batch::<f64>(&refs, &[], dims)
        .unwrap()
        .pairs
        .is_empty());
}
