//! The storefront: static pages the gateway serves next to the API — the items with live
//! stock and a countdown, buying, the buyer's orders and paying (`index.html`, `store.js`),
//! and an admin page that creates, lists and takes down items (`admin.html`). Plain HTML and JavaScript, compiled
//! into the binary and written out by `keel up` for the gateway's static route.

use std::path::Path;

/// The storefront's files: name and contents.
pub const FILES: &[(&str, &str)] = &[
    ("index.html", include_str!("../web/index.html")),
    ("store.js", include_str!("../web/store.js")),
    ("admin.html", include_str!("../web/admin.html")),
    ("style.css", include_str!("../web/style.css")),
];

/// Writes the storefront into `dir` (created if missing), replacing what an older version
/// wrote there.
pub fn write(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, contents) in FILES {
        std::fs::write(dir.join(name), contents)?;
    }
    Ok(())
}
