//! Tool arguments that name one variant of a protocol enum (`mode`, `priority`, `state`).
//!
//! A wrong name must stay a tool error that lists the names, which the assistant reads and
//! corrects; a typed field that failed to deserialize would be a JSON-RPC error instead. So the
//! wire value is any string, read into [`Choice`], and the names come from one list per enum
//! ([`Names`]) that the input schema's `enum` shows and a test holds to the protocol's serde
//! names.

use std::borrow::Cow;

use homelab_deploy_protocol::api::RequestPhase;
use homelab_deploy_protocol::{HostStatus, Mode, Priority};
use rmcp::schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// An enum a tool argument names by its serde name.
pub(crate) trait Names: DeserializeOwned {
    /// Every variant's serde name, in the order the schema lists them.
    const NAMES: &'static [&'static str];
}

impl Names for Mode {
    const NAMES: &'static [&'static str] = &["enqueue", "replace"];
}

impl Names for Priority {
    const NAMES: &'static [&'static str] = &["interactive", "ci", "scheduled"];
}

impl Names for RequestPhase {
    const NAMES: &'static [&'static str] =
        &["queued", "running", "succeeded", "failed", "cancelled"];
}

impl Names for HostStatus {
    const NAMES: &'static [&'static str] = &[
        "built",
        "cached",
        "build_failed",
        "eval_failed",
        "cancelled",
        "timed_out",
    ];
}

/// Schema of a failure group's status: the [`HostStatus`] names that are not a success.
pub(crate) struct FailedStatus;

impl JsonSchema for FailedStatus {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "FailedStatus".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let failed: Vec<&str> = HostStatus::NAMES
            .iter()
            .copied()
            .filter(|name| {
                serde_json::from_value::<HostStatus>((*name).into())
                    .is_ok_and(|status| !status.is_success())
            })
            .collect();
        json_schema!({ "type": "string", "enum": failed })
    }
}

/// A string argument read as a `T`, or kept as given when it names no variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice<T> {
    Known(T),
    Unknown(String),
}

impl<T: Names> Choice<T> {
    /// The variant, or which name `field` was given instead of one of `T`'s.
    pub(crate) fn get(self, field: &'static str) -> Result<T, UnknownName> {
        match self {
            Choice::Known(value) => Ok(value),
            Choice::Unknown(text) => Err(UnknownName {
                field,
                text,
                names: T::NAMES,
            }),
        }
    }
}

/// A tool argument that names no variant; the tool error's text.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {text:?} is not one of {}", names.join(", "))]
pub(crate) struct UnknownName {
    field: &'static str,
    text: String,
    names: &'static [&'static str],
}

impl<'de, T: Names> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(
            match serde_json::from_value(serde_json::Value::String(text.clone())) {
                Ok(value) => Choice::Known(value),
                Err(_) => Choice::Unknown(text),
            },
        )
    }
}

impl<T: Names> JsonSchema for Choice<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Choice".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "enum": T::NAMES })
    }
}

/// Reads an optional [`Choice`] field whose schema is that of a plain [`Choice`].
pub(crate) fn optional<'de, D: Deserializer<'de>, T: Names>(
    deserializer: D,
) -> Result<Option<Choice<T>>, D::Error> {
    Option::<Choice<T>>::deserialize(deserializer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each listed name reads as its variant, and every variant is listed: a new variant fails
    /// to compile here until it is named.
    fn names_match<T: Names + serde::Serialize + PartialEq + std::fmt::Debug>(
        all: &[T],
        listed: fn(&T),
    ) {
        assert_eq!(all.len(), T::NAMES.len());
        for (value, name) in all.iter().zip(T::NAMES) {
            listed(value);
            assert_eq!(serde_json::to_value(value).ok(), Some((*name).into()));
            let read: Choice<T> = serde_json::from_value((*name).into()).expect("a string");
            assert_eq!(read.get("x").ok().as_ref(), Some(value));
        }
    }

    #[test]
    fn names_are_the_protocol_names() {
        names_match(&[Mode::Enqueue, Mode::Replace], |mode| match mode {
            Mode::Enqueue | Mode::Replace => (),
        });
        names_match(
            &[Priority::Interactive, Priority::Ci, Priority::Scheduled],
            |priority| match priority {
                Priority::Interactive | Priority::Ci | Priority::Scheduled => (),
            },
        );
        names_match(
            &[
                HostStatus::Built,
                HostStatus::Cached,
                HostStatus::BuildFailed,
                HostStatus::EvalFailed,
                HostStatus::Cancelled,
                HostStatus::TimedOut,
            ],
            |status| match status {
                HostStatus::Built
                | HostStatus::Cached
                | HostStatus::BuildFailed
                | HostStatus::EvalFailed
                | HostStatus::Cancelled
                | HostStatus::TimedOut => (),
            },
        );
        names_match(
            &[
                RequestPhase::Queued,
                RequestPhase::Running,
                RequestPhase::Succeeded,
                RequestPhase::Failed,
                RequestPhase::Cancelled,
            ],
            |phase| match phase {
                RequestPhase::Queued
                | RequestPhase::Running
                | RequestPhase::Succeeded
                | RequestPhase::Failed
                | RequestPhase::Cancelled => (),
            },
        );
    }

    #[test]
    fn a_failure_groups_status_lists_the_failed_statuses_only() {
        let schema =
            rmcp::schemars::SchemaGenerator::default().into_root_schema_for::<FailedStatus>();
        assert_eq!(
            schema.get("enum"),
            Some(&serde_json::json!([
                "build_failed",
                "eval_failed",
                "cancelled",
                "timed_out"
            ]))
        );
    }

    #[test]
    fn a_wrong_name_is_kept_for_the_error() {
        let read: Choice<Mode> = serde_json::from_value("explode".into()).expect("a string");
        assert_eq!(
            read.get("mode").map_err(|err| err.to_string()),
            Err("mode \"explode\" is not one of enqueue, replace".to_owned())
        );
    }
}
