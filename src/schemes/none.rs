//! Plain federated learning: updates travel as f32 safetensors and the server reads every one.

use std::time::Instant;

use rand::rngs::StdRng;

use super::{
    aggregate_readable, read_plain, Aggregate, NamedTensors, Scheme, ThreatModel, Upload, View,
};
use crate::fl::Transmission;
use crate::Result;

/// No protection: the baseline every other scheme is compared with.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainScheme;

impl Scheme for PlainScheme {
    fn id(&self) -> &str {
        "none"
    }

    fn parameters(&self) -> String {
        String::new()
    }

    fn encode(
        &mut self,
        _client: usize,
        update: &NamedTensors,
        _rng: &mut StdRng,
    ) -> Result<Upload> {
        let started = Instant::now();
        let transmission = Transmission::plain(update, None)?;
        Ok(Upload {
            transmission,
            encode_seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn server_reads(
        &self,
        upload: &Transmission,
        template: &NamedTensors,
    ) -> Result<Option<NamedTensors>> {
        Ok(Some(read_plain(upload, template)?))
    }

    fn aggregate(
        &mut self,
        weighted: &[(usize, &Upload)],
        template: &NamedTensors,
    ) -> Result<Aggregate> {
        aggregate_readable(self, weighted, template)
    }

    fn threat_models(&self) -> Vec<ThreatModel> {
        vec![ThreatModel {
            id: "server".into(),
            description: "An honest-but-curious server reads every client's update in the clear."
                .into(),
            view: View::ClientUpdates,
        }]
    }
}
