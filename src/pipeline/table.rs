//! A stage's table in a recipe, as its parser sees it: the settings (read into the stage's
//! own struct, so an unknown key or a wrong type names its line) and the `[stage.layers]`
//! overrides.

use super::layers::LayerRules;
use serde::de::DeserializeOwned;
use std::ops::Range;
use toml::Spanned;
use toml::de::{DeValue, ValueDeserializer};

/// A mistake in a recipe, with the bytes it is about.
#[derive(Debug, Clone)]
pub struct Error {
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Error {
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Error {
            span: Some(span),
            message: message.into(),
        }
    }
}

impl From<toml::de::Error> for Error {
    fn from(e: toml::de::Error) -> Self {
        Error {
            span: e.span(),
            message: e.message().trim().to_string(),
        }
    }
}

/// Settings parsed from no flags at all: the defaults clap declares, so a recipe key left
/// out means what leaving out the flag means, and defaults are written in one place.
pub fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(Vec::<String>::new())
        .expect("every setting has a default");
    T::from_arg_matches(&matches).expect("defaults parse")
}

/// One `[[stage]]` table, handed to the stage's parser.
pub struct StageTable<'a> {
    pub kind: String,
    /// The table without `kind` and `layers`.
    pub(super) table: Spanned<DeValue<'a>>,
    pub(super) layers: Option<Spanned<DeValue<'a>>>,
}

impl StageTable<'_> {
    /// The stage's settings: every key must be a field of `P`.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, Error> {
        Ok(P::deserialize(ValueDeserializer::from(self.table.clone()))?)
    }

    /// The `[stage.layers]` overrides, each pattern's table read as an `L`.
    pub fn layers<L: DeserializeOwned>(&self) -> Result<LayerRules<L>, Error> {
        let Some(layers) = &self.layers else {
            return Ok(LayerRules::default());
        };
        let table = layers.get_ref().as_table().ok_or_else(|| {
            Error::at(
                layers.span(),
                "layers must be a table of pattern = { settings }",
            )
        })?;
        let mut rules = Vec::new();
        for (pattern, value) in table.iter() {
            let v = L::deserialize(ValueDeserializer::from(value.clone()))?;
            rules.push((pattern.get_ref().to_string(), v));
        }
        Ok(LayerRules(rules))
    }

    /// Refuses `[stage.layers]` for a stage that has no per-layer settings.
    pub fn no_layers(&self) -> Result<(), Error> {
        match &self.layers {
            Some(l) => Err(Error::at(
                l.span(),
                format!("the {} stage has no per-layer settings", self.kind),
            )),
            None => Ok(()),
        }
    }
}
