//! tonic's services (health, reflection, the admin and the product's
//! `ProbeUploadService`) as one `Handler`: the table's last entry.

use tonic::codegen::Service;
use tonic::service::Routes;

use crate::server::edge::{Answer, Call, Handler};

pub struct TonicRoutes(pub Routes);

impl Handler for TonicRoutes {
    fn call(&self, call: Call) -> Answer {
        let mut routes = self.0.clone();
        Box::pin(async move {
            match routes.call(call.request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        })
    }
}
