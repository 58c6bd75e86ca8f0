//! GLWE vector encryption over tfhe-rs `core_crypto` (being written).
