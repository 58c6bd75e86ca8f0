//! Turning what was captured into what each party observes, running attacks on it, and scoring them.
//!
//! The private batch travels beside an observation only to be scored; attacks never receive it.

mod observe;

pub use observe::{observation_of, private_images, PrivateImages};
