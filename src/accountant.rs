//! Rényi-DP accountant for the subsampled Gaussian mechanism (being written).
