//! Writing results: PNG images and image grids, the audit's CSV/JSON files, and the self-contained HTML
//! report with inline SVG charts.

mod audit_report;
mod images;
mod plots;

pub use audit_report::{write_atomically, write_audit_report, RunMetadata, REPORT_TEMPLATE};
pub use images::{image_grid, write_png};
pub use plots::{Chart, ChartKind, Series};
