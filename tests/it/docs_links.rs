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

/// Every problem's `type` URI names a page and an anchor of this crate's rustdoc:
/// `…/tower_idempotency/problem/index.html#<slug>`. The module's docs hold one heading per
/// problem type, whose text is its slug (rustdoc derives a heading's id from its text); when
/// `cargo doc` has been run (CI runs it before the tests), the generated page is checked too.
#[test]
fn every_problem_type_uri_names_an_anchor_of_the_generated_docs() {
    use tower_idempotency::problem::ProblemKind;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/http/problem.rs")).unwrap();
    let headings: Vec<&str> = source
        .lines()
        .filter_map(|line| line.strip_prefix("//! ## "))
        .collect();
    let mut page = None;
    for kind in ProblemKind::ALL {
        let uri = kind.type_uri();
        let (path, anchor) = uri.split_once('#').expect("a type URI has an anchor");
        assert_eq!(anchor, kind.slug(), "{uri}");
        assert!(
            headings.contains(&anchor),
            "no `//! ## {anchor}` heading in src/http/problem.rs's module docs for {uri}"
        );
        let relative = path
            .split_once("/latest/")
            .map(|(_, relative)| relative)
            .expect("a docs.rs URI");
        match &page {
            None => page = Some(relative.to_owned()),
            Some(page) => assert_eq!(page, relative, "every problem type is on one page"),
        }
    }
    assert_eq!(
        headings.len(),
        ProblemKind::ALL.len(),
        "one heading per kind"
    );

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let html = target.join("doc").join(page.unwrap());
    let fresh = |html: &Path| -> bool {
        let modified = |path: &Path| std::fs::metadata(path).and_then(|meta| meta.modified());
        match (modified(html), modified(&root.join("src/http/problem.rs"))) {
            (Ok(built), Ok(edited)) => built >= edited,
            _ => false,
        }
    };
    if !fresh(&html) {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing or older than src/http/problem.rs: run `cargo doc --no-deps --all-features` first",
            html.display()
        );
        println!(
            "SKIPPED: the generated page ({}) is missing or stale; run `cargo doc --no-deps` to check it",
            html.display()
        );
        return;
    }
    let html = std::fs::read_to_string(&html).unwrap();
    let missing: Vec<_> = ProblemKind::ALL
        .iter()
        .filter(|kind| !html.contains(&format!("id=\"{}\"", kind.slug())))
        .map(|kind| kind.slug())
        .collect();
    assert!(
        missing.is_empty(),
        "anchors missing in the generated page: {missing:?}"
    );
}

/// The axum guide's program is `examples/axum_quickstart.rs` (which CI compiles), from its
/// first `use` on, word for word.
#[test]
fn the_readmes_axum_program_is_the_example_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("docs/axum.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/axum_quickstart.rs")).unwrap();
    let program = &example[example.find("use axum::").expect("the example's first use")..];
    let shown = readme
        .split("```rust,no_run\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(code, _)| code))
        .find(|code| code.starts_with("use axum::"))
        .expect("the axum guide shows the program");
    assert_eq!(
        shown, program,
        "the axum guide's program differs from examples/axum_quickstart.rs"
    );
}

/// Every guide the rustdoc names (`` `docs/NAME.md` ``, as the crate's front page and the
/// items that point to a guide do) exists, and the front page names every guide.
#[test]
fn every_guide_the_rustdoc_names_exists_and_the_front_page_names_them_all() {
    fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                found.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let mut named = Vec::new();
    let mut missing = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (at, _) in text.match_indices("`docs/") {
            let rest = &text[at + 1..];
            let Some(end) = rest.find('`') else { continue };
            let guide = &rest[..end];
            if guide.ends_with(".md") {
                if !root.join(guide).exists() {
                    missing.push(format!("{}: {guide}", file.display()));
                }
                if file.ends_with("src/lib.rs") {
                    named.push(guide.to_owned());
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "guides named but missing:\n{}",
        missing.join("\n")
    );
    let unnamed: Vec<_> = documents()
        .into_iter()
        .filter(|path| path.parent().is_some_and(|dir| dir.ends_with("docs")))
        .map(|path| format!("docs/{}", path.file_name().unwrap().to_string_lossy()))
        .filter(|guide| !named.contains(guide))
        .collect();
    assert!(
        unnamed.is_empty(),
        "guides the crate's front page does not name: {unnamed:?}"
    );
}
