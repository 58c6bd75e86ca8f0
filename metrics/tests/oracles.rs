//! Oracle test: every metric against the scikit-image 0.26 reference values in
//! `fixtures/oracles/oracles.json`, for all 16 pairs, both from the exact float64 `.npy` arrays
//! ("float") and from the 8-bit PNGs divided by 255 ("u8"). Prints the largest deviation per metric.

use std::fs;
use std::path::{Path, PathBuf};

use fedleak_metrics::{score_pair, ImageDims, Score};
use serde_json::Value;

const PSNR_TOLERANCE_DB: f64 = 1e-3;
const SSIM_TOLERANCE: f64 = 1e-4;
const NMI_TOLERANCE: f64 = 1e-4;
const PAIRS_EXPECTED: usize = 16;

fn oracle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/oracles")
}

fn load_oracles() -> Value {
    let path = oracle_dir().join("oracles.json");
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read `{}`: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse `{}`: {e}", path.display()))
}

/// A float64 C-order `.npy` array: its shape and values.
struct Npy {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// Minimal `.npy` reader: versions 1-3, `'<f8'`, C order only.
fn read_npy(path: &Path) -> Npy {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("cannot read `{}`: {e}", path.display()));
    assert_eq!(
        &bytes[..6],
        b"\x93NUMPY",
        "`{}` is not a .npy file",
        path.display()
    );
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => panic!("`{}`: unsupported .npy version {v}", path.display()),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f8'"),
        "`{}`: not float64: {header}",
        path.display()
    );
    assert!(
        header.contains("'fortran_order': False"),
        "`{}`: not C order: {header}",
        path.display()
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("`{}`: no shape in {header}", path.display()));
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let body = &bytes[header_start + header_len..];
    let count: usize = shape.iter().product();
    assert_eq!(body.len(), count * 8, "`{}`: body size", path.display());
    let data = body
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Npy { shape, data }
}

/// Dims of an oracle shape: `(H, W)` grayscale or `(H, W, C)` interleaved.
fn dims_of(shape: &[usize]) -> ImageDims {
    match *shape {
        [h, w] => ImageDims::new(1, h, w),
        [h, w, c] => ImageDims::new(c, h, w),
        _ => panic!("unexpected oracle shape {shape:?}"),
    }
}

/// `H x W x C` interleaved -> planar `C x H x W`.
fn to_planar(interleaved: &[f64], dims: ImageDims) -> Vec<f64> {
    let c = dims.channels;
    let plane = dims.plane_len();
    let mut planar = vec![0.0; interleaved.len()];
    for (i, &v) in interleaved.iter().enumerate() {
        planar[(i % c) * plane + i / c] = v;
    }
    planar
}

fn load_npy_planar(name: &str, dims: ImageDims) -> Vec<f64> {
    let npy = read_npy(&oracle_dir().join(name));
    assert_eq!(dims_of(&npy.shape), dims, "`{name}` shape {:?}", npy.shape);
    to_planar(&npy.data, dims)
}

fn load_png_planar(name: &str, dims: ImageDims) -> Vec<f64> {
    let path = oracle_dir().join(name);
    let image =
        image::open(&path).unwrap_or_else(|e| panic!("cannot open `{}`: {e}", path.display()));
    let raw: Vec<u8> = match (dims.channels, image.color()) {
        (1, image::ColorType::L8) => image.to_luma8().into_raw(),
        (3, image::ColorType::Rgb8) => image.to_rgb8().into_raw(),
        (c, color) => panic!("`{name}`: expected {c} channel(s) of 8 bits, got {color:?}"),
    };
    assert_eq!(
        (image.height() as usize, image.width() as usize),
        (dims.height, dims.width)
    );
    let values: Vec<f64> = raw.iter().map(|&v| f64::from(v) / 255.0).collect();
    to_planar(&values, dims)
}

/// An oracle number; `"inf"` is how the JSON stores an infinite PSNR.
fn oracle_value(metrics: &Value, key: &str) -> f64 {
    match &metrics[key] {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) if s == "inf" => f64::INFINITY,
        other => panic!("oracle `{key}` is not a number: {other}"),
    }
}

/// Largest absolute deviation seen per metric.
#[derive(Default)]
struct MaxDeviation {
    psnr_db: f64,
    ssim: f64,
    ssim_skimage: f64,
    nmi_studholme: f64,
    nmi: f64,
}

fn deviation(got: f64, want: f64) -> f64 {
    if got.is_infinite() || want.is_infinite() {
        if got == want {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (got - want).abs()
    }
}

fn check_variant(
    variant: &str,
    load: fn(&str, ImageDims) -> Vec<f64>,
    ref_key: &str,
    test_key: &str,
) {
    let oracles = load_oracles();
    let pairs = oracles["pairs"].as_array().expect("`pairs` array");
    assert_eq!(pairs.len(), PAIRS_EXPECTED);
    let mut max = MaxDeviation::default();
    let mut failures = Vec::new();
    for pair in pairs {
        let name = format!(
            "{} {} ({variant})",
            pair["image"].as_str().unwrap(),
            pair["distortion"].as_str().unwrap()
        );
        let shape: Vec<usize> = pair["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let dims = dims_of(&shape);
        let reference = load(pair[ref_key].as_str().unwrap(), dims);
        let test = load(pair[test_key].as_str().unwrap(), dims);
        let score: Score = score_pair(&reference, &test, dims).unwrap();
        let want = &pair[variant];

        let checks = [
            (
                "psnr_db",
                score.psnr_db,
                oracle_value(want, "psnr_dr1"),
                PSNR_TOLERANCE_DB,
                &mut max.psnr_db,
            ),
            (
                "ssim",
                score.ssim,
                oracle_value(want, "ssim_wang_gaussian"),
                SSIM_TOLERANCE,
                &mut max.ssim,
            ),
            (
                "ssim_skimage",
                score.ssim_skimage,
                oracle_value(want, "ssim_skimage_default"),
                SSIM_TOLERANCE,
                &mut max.ssim_skimage,
            ),
            (
                "nmi_studholme",
                score.nmi_studholme,
                oracle_value(want, "nmi_skimage_studholme_bins100"),
                NMI_TOLERANCE,
                &mut max.nmi_studholme,
            ),
            (
                "nmi",
                score.nmi,
                oracle_value(want, "nmi_skimage_studholme_bins100") - 1.0,
                NMI_TOLERANCE,
                &mut max.nmi,
            ),
        ];
        for (metric, got, expected, tolerance, max_seen) in checks {
            let d = deviation(got, expected);
            *max_seen = max_seen.max(d);
            if d > tolerance {
                failures.push(format!(
                    "{name}: {metric} = {got}, oracle {expected}, deviation {d:e}"
                ));
            }
        }
    }
    println!(
        "{variant}: max |deviation| over {} pairs: psnr_db {:e}, ssim {:e}, ssim_skimage {:e}, nmi_studholme {:e}, nmi {:e}",
        pairs.len(),
        max.psnr_db,
        max.ssim,
        max.ssim_skimage,
        max.nmi_studholme,
        max.nmi
    );
    assert!(
        failures.is_empty(),
        "metrics off the scikit-image oracle:\n{}",
        failures.join("\n")
    );
}

#[test]
fn float_variant_matches_scikit_image() {
    check_variant("float", load_npy_planar, "ref_npy", "test_npy");
}

#[test]
fn u8_png_variant_matches_scikit_image() {
    check_variant("u8", load_png_planar, "ref_png", "test_png");
}

#[test]
fn npy_reader_layout_and_mse_match_the_oracle() {
    // The oracle's own MSE pins the pixel layout: a wrong interleaved -> planar conversion still gives
    // the same MSE, so check that the planar RGB reference really is channel-major.
    let npy = read_npy(&oracle_dir().join("rgb_ref.npy"));
    let dims = dims_of(&npy.shape);
    let planar = to_planar(&npy.data, dims);
    // Pixel (row 5, col 7), channel 2 (blue).
    let interleaved_index = (5 * dims.width + 7) * 3 + 2;
    let planar_index = 2 * dims.plane_len() + 5 * dims.width + 7;
    assert_eq!(planar[planar_index], npy.data[interleaved_index]);
    for pair in load_oracles()["pairs"].as_array().unwrap() {
        let shape: Vec<usize> = pair["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let dims = dims_of(&shape);
        let reference = load_npy_planar(pair["ref_npy"].as_str().unwrap(), dims);
        let test = load_npy_planar(pair["test_npy"].as_str().unwrap(), dims);
        let got = fedleak_metrics::mse(&reference, &test, dims).unwrap();
        let want = oracle_value(&pair["float"], "mse");
        assert!(
            (got - want).abs() <= 1e-12 * want.max(1e-300),
            "{}: mse {got} vs {want}",
            pair["distortion"]
        );
    }
}
