//! How the controller's own errors become gRPC statuses, for the API handlers and `auth`
//! alike: a store failure is logged here and told to the caller as internal, with what to
//! check; rollout errors keep their kind (invalid, not found, conflict).

use crate::rollout::RolloutError;
use crate::store::StoreError;
use tonic::Status;

pub fn store_status(e: StoreError) -> Status {
    tracing::error!("{e}");
    Status::internal(format!(
        "{e}; the controller's data directory may be damaged or full"
    ))
}

pub fn rollout_status(e: RolloutError) -> Status {
    match e {
        RolloutError::Invalid(m) => Status::invalid_argument(m),
        RolloutError::NotFound(m) => Status::not_found(m),
        RolloutError::Conflict(m) => Status::failed_precondition(m),
        RolloutError::BudgetSpent(m) => Status::resource_exhausted(m),
        RolloutError::Store(e) => store_status(e),
    }
}
