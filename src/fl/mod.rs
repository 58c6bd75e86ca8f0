//! Federated simulation. (Being written.)
