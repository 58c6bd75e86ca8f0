//! Packed Paillier encryption over `fast-paillier` (being written).
