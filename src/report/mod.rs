//! Writing results: PNG images and image grids (CSV, JSON and HTML reports join here).

mod images;

pub use images::{image_grid, write_png};
