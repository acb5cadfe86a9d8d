//! The README and the guides link only to files that exist in the package, so that a link
//! followed on crates.io, on GitHub or in a checkout never leads nowhere.

use std::path::{Path, PathBuf};

/// Every relative link target (`[text](target)`, without its `#anchor`) in `markdown`.
fn relative_links(markdown: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or_default();
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            links.push(target.to_owned());
        }
    }
    links
}

fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut documents = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|extension| extension == "md") {
            documents.push(path);
        }
    }
    documents
}

#[test]
fn every_relative_link_in_the_readme_and_the_guides_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for document in documents() {
        let text = std::fs::read_to_string(&document).unwrap();
        for target in relative_links(&text) {
            checked += 1;
            if !document.parent().unwrap().join(&target).exists() {
                broken.push(format!("{}: {target}", document.display()));
            }
        }
    }
    assert!(
        checked >= 11,
        "the README links every guide; found {checked} links"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_guide_is_linked_from_the_readme() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"));
    let links = relative_links(&readme.unwrap());
    let unlinked: Vec<_> = documents()
        .into_iter()
        .filter(|path| path.parent().is_some_and(|dir| dir.ends_with("docs")))
        .map(|path| format!("docs/{}", path.file_name().unwrap().to_string_lossy()))
        .filter(|guide| !links.contains(guide))
        .collect();
    assert!(
        unlinked.is_empty(),
        "guides the README does not link: {unlinked:?}"
    );
}
