//! Configuration errors: every problem names the resource and the field it
//! was found in, so an operator can go straight to the line to fix.

use std::fmt;

/// One problem with the configuration.
///
/// Displays as `listener "web": field address.socket_address.port_value: 70000
/// is out of range (0-65535)`, followed by ` (hint: …)` when there is a hint.
/// Document-level problems (syntax errors, map limits) have an empty `field`
/// and display as `resource: message`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
pub struct ConfigError {
    /// The resource the problem is in, e.g. `listener "web"`, `cluster "reviews"`,
    /// `document`.
    pub resource: String,
    /// The field path inside the resource, e.g. `load_assignment.endpoints[0]`;
    /// empty when the problem is about the resource or document as a whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub hint: Option<String>,
}

impl ConfigError {
    /// A new error without a hint.
    pub fn new(
        resource: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            resource: resource.into(),
            field: field.into(),
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.resource)?;
        if !self.field.is_empty() {
            write!(f, "field {}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// All problems found in a configuration (never empty when returned as an
/// error). Displays one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The problems, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no problem (an empty list is never returned as an error).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors and warnings while walking a configuration.
#[derive(Debug, Default)]
pub(crate) struct Diag {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<String>,
}

impl Diag {
    pub fn error(&mut self, resource: &str, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::new(resource, field, message));
    }

    pub fn error_hint(
        &mut self,
        resource: &str,
        field: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.errors
            .push(ConfigError::new(resource, field, message).with_hint(hint));
    }

    /// Records a warning formatted like an error: `resource: field f: message`.
    pub fn warn(&mut self, resource: &str, field: &str, message: impl Into<String>) {
        self.warnings
            .push(ConfigError::new(resource, field, message).to_string());
    }
}

/// Joins a field path and a child field name.
pub(crate) fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Joins a field path and a list index.
pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_hint() {
        let e = ConfigError::new(
            "listener \"web\"",
            "address.socket_address.port_value",
            "70000 is out of range (0-65535)",
        );
        assert_eq!(
            e.to_string(),
            "listener \"web\": field address.socket_address.port_value: 70000 is out of range (0-65535)"
        );
        let e = e.with_hint("ports are 16-bit");
        assert!(e.to_string().ends_with(" (hint: ports are 16-bit)"));
        let doc = ConfigError::new("document", "", "empty");
        assert_eq!(doc.to_string(), "document: empty");
        let all = ConfigErrors(vec![doc.clone(), doc]);
        assert_eq!(all.to_string(), "document: empty\ndocument: empty");
    }
}
