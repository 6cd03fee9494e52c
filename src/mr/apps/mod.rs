//! The built-in applications and the registry of user-facing applications by name.

mod indexer;
mod wc;

use std::sync::Arc;

pub use indexer::Indexer;
pub use wc::{WordCount, for_each_word};

use super::app::App;
use super::error::MrError;

/// Names of the user-facing applications, as accepted by [`app_by_name`].
pub const APP_NAMES: &[&str] = &["wc", "indexer"];

/// The user-facing application called `name`: `wc` or `indexer`. (The lab's test applications
/// are in [`crate::mr::test_apps`], deliberately not here.)
pub fn app_by_name(name: &str) -> Result<Arc<dyn App>, MrError> {
    match name {
        "wc" => Ok(Arc::new(WordCount)),
        "indexer" => Ok(Arc::new(Indexer)),
        _ => Err(MrError::UnknownApp {
            name: name.to_string(),
            known: APP_NAMES.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves every listed name resolves to an app of that name, and others are a clear error.
    #[test]
    fn registry_resolves_listed_names_only() {
        for name in APP_NAMES {
            assert_eq!(app_by_name(name).unwrap().name(), *name);
        }
        match app_by_name("mtiming") {
            Err(MrError::UnknownApp { name, known }) => {
                assert_eq!(name, "mtiming");
                assert_eq!(known, "wc, indexer");
            }
            other => panic!(
                "expected UnknownApp, got {:?}",
                other.map(|a| a.name().to_string())
            ),
        }
    }
}
