//! The `fedleak` command line (being written).
fn main() {}
