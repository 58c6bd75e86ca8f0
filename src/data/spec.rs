//! Data source specifications: the string `--data` takes, parsed into a [`DataSpec`].
//!
//! Accepted forms: `fixture:NAME` (a dataset embedded in the binary, see [`FixtureName`]),
//! `medmnist:PATH.npz` (a MedMNIST-layout archive), `folder:DIR` (an ImageFolder tree), and a bare
//! path to an existing directory (= `folder:`) or an existing `.npz` file (= `medmnist:`). Unknown
//! schemes and names are rejected with the accepted values and the nearest match.
//!
//! This module only parses and names sources: it must not read images (the loaders do).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{Error, Result};

/// A dataset embedded in the `fedleak` binary (copied from `fixtures/`, see its README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FixtureName {
    /// `ihc-tiles-32`: 626 RGB 32x32 immunohistochemistry tiles, 2 classes (the default audit dataset).
    IhcTiles32,
    /// `mnist5k`: 5000 MNIST digits 28x28 in the MedMNIST `.npz` layout, 10 classes.
    Mnist5k,
    /// `digits-8x8`: 1797 grayscale 8x8 handwritten digits, 10 classes, no split folders.
    Digits8x8,
    /// `lfw-subset-25x25`: 200 grayscale 25x25 face / non-face images, 2 classes, no split folders.
    LfwSubset25x25,
}

impl FixtureName {
    /// Every fixture, in the order they are listed to users.
    pub const ALL: [FixtureName; 4] = [
        FixtureName::IhcTiles32,
        FixtureName::Mnist5k,
        FixtureName::Digits8x8,
        FixtureName::LfwSubset25x25,
    ];

    /// The name used after `fixture:`.
    ///
    /// ```
    /// use fedleak::data::FixtureName;
    /// assert_eq!(FixtureName::Mnist5k.as_str(), "mnist5k");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            FixtureName::IhcTiles32 => "ihc-tiles-32",
            FixtureName::Mnist5k => "mnist5k",
            FixtureName::Digits8x8 => "digits-8x8",
            FixtureName::LfwSubset25x25 => "lfw-subset-25x25",
        }
    }
}

impl fmt::Display for FixtureName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FixtureName {
    type Err = Error;

    /// Parses a fixture name (without `fixture:`); unknown names give [`Error::UnknownData`].
    fn from_str(name: &str) -> Result<Self> {
        FixtureName::ALL
            .into_iter()
            .find(|f| f.as_str() == name)
            .ok_or_else(|| unknown_fixture(&format!("fixture:{name}"), name))
    }
}

/// Where the images come from: what `--data` (and the `data` config key) holds.
///
/// Serialised as its string form (`fixture:ihc-tiles-32`, `medmnist:PATH`, `folder:DIR`), so a TOML
/// config holds it as a plain string. The default is `fixture:ihc-tiles-32`.
///
/// ```
/// use fedleak::data::{DataSpec, FixtureName};
/// let spec: DataSpec = "fixture:mnist5k".parse()?;
/// assert_eq!(spec, DataSpec::Fixture(FixtureName::Mnist5k));
/// assert_eq!(spec.to_string(), "fixture:mnist5k");
/// let folder: DataSpec = "folder:/data/tiles".parse()?;
/// assert_eq!(folder, DataSpec::Folder("/data/tiles".into()));
/// assert!("fixture:mnist".parse::<DataSpec>().is_err());
/// # Ok::<(), fedleak::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DataSpec {
    /// A dataset embedded in the binary.
    Fixture(FixtureName),
    /// A MedMNIST-layout `.npz` archive (`train_images`, `train_labels`, `test_images`, `test_labels`).
    MedMnist(PathBuf),
    /// An ImageFolder tree `DIR/[split/]label/*.png|jpg|jpeg`.
    Folder(PathBuf),
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec::Fixture(FixtureName::IhcTiles32)
    }
}

/// The schemes a spec may start with, with the form shown to users.
const SCHEMES: [(&str, &str); 3] = [
    ("fixture", "fixture:NAME"),
    ("medmnist", "medmnist:PATH.npz"),
    ("folder", "folder:DIR"),
];

impl DataSpec {
    /// Parses `text`; the same as `text.parse()`.
    ///
    /// A bare path (no known scheme) is accepted when it names an existing directory (an image
    /// folder) or an existing `.npz` file.
    ///
    /// ```
    /// use fedleak::data::DataSpec;
    /// let dir = std::env::temp_dir();
    /// let spec = DataSpec::parse(dir.to_str().unwrap())?;
    /// assert_eq!(spec, DataSpec::Folder(dir));
    /// # Ok::<(), fedleak::Error>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self> {
        if let Some((scheme, rest)) = text.split_once(':') {
            match scheme {
                "fixture" => return rest.parse::<FixtureName>().map(DataSpec::Fixture),
                "medmnist" => return Ok(DataSpec::MedMnist(non_empty_path(text, rest)?)),
                "folder" => return Ok(DataSpec::Folder(non_empty_path(text, rest)?)),
                _ => {}
            }
        }
        let path = Path::new(text);
        if !text.is_empty() && path.is_dir() {
            return Ok(DataSpec::Folder(path.to_path_buf()));
        }
        if path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
        {
            return Ok(DataSpec::MedMnist(path.to_path_buf()));
        }
        Err(unknown_form(text))
    }

    /// The same source with a relative folder or archive path made absolute against the working
    /// directory (lexically: symbolic links are kept), so that a record naming it (the private
    /// record of a capture, `train.json`) still finds it when read from another directory.
    ///
    /// ```
    /// use fedleak::data::DataSpec;
    /// let spec = DataSpec::parse("folder:tiles")?.absolute()?;
    /// assert_eq!(spec, DataSpec::Folder(std::env::current_dir()?.join("tiles")));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] when the working directory cannot be read.
    pub fn absolute(self) -> Result<Self> {
        let absolute =
            |path: PathBuf| std::path::absolute(&path).map_err(|source| Error::Io { path, source });
        Ok(match self {
            DataSpec::Fixture(name) => DataSpec::Fixture(name),
            DataSpec::MedMnist(path) => DataSpec::MedMnist(absolute(path)?),
            DataSpec::Folder(dir) => DataSpec::Folder(absolute(dir)?),
        })
    }
}

impl FromStr for DataSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        DataSpec::parse(text)
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Fixture(name) => write!(f, "fixture:{name}"),
            DataSpec::MedMnist(path) => write!(f, "medmnist:{}", path.display()),
            DataSpec::Folder(dir) => write!(f, "folder:{}", dir.display()),
        }
    }
}

impl TryFrom<String> for DataSpec {
    type Error = Error;

    fn try_from(text: String) -> Result<Self> {
        DataSpec::parse(&text)
    }
}

impl From<DataSpec> for String {
    fn from(spec: DataSpec) -> String {
        spec.to_string()
    }
}

fn non_empty_path(spec: &str, rest: &str) -> Result<PathBuf> {
    if rest.is_empty() {
        return Err(Error::UnknownData {
            spec: spec.into(),
            reason: "the path after the scheme is empty".into(),
            hint: format!("write {}", accepted_forms()),
        });
    }
    Ok(PathBuf::from(rest))
}

fn accepted_forms() -> String {
    let forms: Vec<String> = SCHEMES.iter().map(|(_, f)| format!("`{f}`")).collect();
    format!("{} or the path of an existing directory", forms.join(", "))
}

fn fixture_list() -> String {
    let names: Vec<String> = FixtureName::ALL
        .iter()
        .map(|f| format!("`{}`", f.as_str()))
        .collect();
    names.join(", ")
}

fn unknown_fixture(spec: &str, name: &str) -> Error {
    let names: Vec<&str> = FixtureName::ALL.iter().map(|f| f.as_str()).collect();
    let nearest = nearest(name, &names).unwrap_or("ihc-tiles-32");
    Error::UnknownData {
        spec: spec.into(),
        reason: format!("no fixture is named `{name}`"),
        hint: format!(
            "fixtures are {}; the nearest is `fixture:{nearest}`",
            fixture_list()
        ),
    }
}

fn unknown_form(text: &str) -> Error {
    match text.split_once(':') {
        Some((scheme, _)) if !scheme.is_empty() && !scheme.contains(['/', '\\', '.']) => {
            let schemes: Vec<&str> = SCHEMES.iter().map(|(s, _)| *s).collect();
            let nearest = nearest(scheme, &schemes).unwrap_or("folder");
            Error::UnknownData {
                spec: text.into(),
                reason: format!("unknown scheme `{scheme}:`"),
                hint: format!(
                    "use {}; the nearest scheme is `{nearest}:`",
                    accepted_forms()
                ),
            }
        }
        _ => {
            let mut candidates: Vec<String> = FixtureName::ALL
                .iter()
                .map(|f| format!("fixture:{f}"))
                .collect();
            candidates.extend(FixtureName::ALL.iter().map(|f| f.as_str().to_string()));
            let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
            let nearest = nearest(text, &refs).unwrap_or("ihc-tiles-32");
            let nearest = nearest.strip_prefix("fixture:").unwrap_or(nearest);
            Error::UnknownData {
                spec: text.into(),
                reason: "no scheme, and not an existing directory or `.npz` file".into(),
                hint: format!(
                    "use {} (fixtures: {}); the nearest is `fixture:{nearest}`",
                    accepted_forms(),
                    fixture_list()
                ),
            }
        }
    }
}

/// The candidate with the smallest edit distance to `word` (the first on ties).
pub(crate) fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .min_by_key(|c| edit_distance(word, c))
        .copied()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> String {
        DataSpec::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn every_fixture_name_round_trips() {
        for name in FixtureName::ALL {
            let spec = DataSpec::parse(&format!("fixture:{name}")).unwrap();
            assert_eq!(spec, DataSpec::Fixture(name));
            assert_eq!(DataSpec::parse(&spec.to_string()).unwrap(), spec);
        }
    }

    #[test]
    fn paths_keep_their_scheme() {
        assert_eq!(
            DataSpec::parse("medmnist:/x/pathmnist.npz").unwrap(),
            DataSpec::MedMnist("/x/pathmnist.npz".into())
        );
        assert_eq!(
            DataSpec::parse("folder:C:/data").unwrap(),
            DataSpec::Folder("C:/data".into())
        );
    }

    #[test]
    fn bare_existing_directory_and_npz_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().to_str().unwrap();
        assert_eq!(
            DataSpec::parse(text).unwrap(),
            DataSpec::Folder(dir.path().into())
        );
        let npz = dir.path().join("a.npz");
        std::fs::write(&npz, b"x").unwrap();
        assert_eq!(
            DataSpec::parse(npz.to_str().unwrap()).unwrap(),
            DataSpec::MedMnist(npz.clone())
        );
    }

    #[test]
    fn unknown_fixture_lists_names_and_nearest() {
        let err = DataSpec::parse("fixture:mnist").unwrap_err();
        assert!(matches!(err, Error::UnknownData { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("no fixture is named `mnist`"), "{msg}");
        assert!(msg.contains("`lfw-subset-25x25`"), "{msg}");
        assert!(msg.contains("the nearest is `fixture:mnist5k`"), "{msg}");
    }

    #[test]
    fn unknown_scheme_names_nearest_scheme() {
        let msg = message("fixtures:ihc-tiles-32");
        assert!(msg.contains("unknown scheme `fixtures:`"), "{msg}");
        assert!(msg.contains("the nearest scheme is `fixture:`"), "{msg}");
        assert!(msg.contains("`medmnist:PATH.npz`"), "{msg}");
    }

    #[test]
    fn bare_fixture_name_suggests_fixture_scheme() {
        let msg = message("digits-8x8");
        assert!(msg.contains("not an existing directory"), "{msg}");
        assert!(msg.contains("the nearest is `fixture:digits-8x8`"), "{msg}");
    }

    #[test]
    fn empty_path_is_rejected() {
        assert!(message("folder:").contains("path after the scheme is empty"));
    }

    #[test]
    fn serde_uses_the_string_form() {
        #[derive(Debug, serde::Serialize, serde::Deserialize)]
        struct Config {
            data: DataSpec,
        }
        let config: Config = serde_json::from_str(r#"{"data":"fixture:digits-8x8"}"#).unwrap();
        assert_eq!(config.data, DataSpec::Fixture(FixtureName::Digits8x8));
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"data":"fixture:digits-8x8"}"#
        );
        let err = serde_json::from_str::<Config>(r#"{"data":"fixture:nope"}"#).unwrap_err();
        assert!(err.to_string().contains("no fixture is named `nope`"));
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
    }
}
