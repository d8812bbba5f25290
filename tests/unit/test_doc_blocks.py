"""The code-block finder behind tests/integration/test_docs.py: fences, info strings and
what each block's kind says about running it."""

from __future__ import annotations

import pathlib

from tests.support.docs import blocks, documents

DOC = """# Title

```sh
curl -s localhost:8080/healthz
```

- a list item:

  ```sh no-run
  make test
  ```

````text
```js
not a block of its own
```
````

~~~js
await fetch("/healthz");
~~~

```
bare fence
```

```yaml
a: 1
```

```rust
fn main() {}
```
"""


def test_fences_info_strings_and_kinds(tmp_path: pathlib.Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(DOC)
    found = [(b.line, b.info, b.kind, b.code) for b in blocks(doc)]
    assert found == [
        (3, "sh", "shell", "curl -s localhost:8080/healthz\n"),
        (9, "sh no-run", "shown", "make test\n"),
        (13, "text", "shown", "```js\nnot a block of its own\n```\n"),
        (19, "js", "browser", 'await fetch("/healthz");\n'),
        (23, "", "unknown", "bare fence\n"),
        (27, "yaml", "shown", "a: 1\n"),
        (31, "rust", "unknown", "fn main() {}\n"),
    ]


def test_documents_are_the_readme_and_every_page_under_docs(tmp_path: pathlib.Path) -> None:
    (tmp_path / "README.md").write_text("# x\n")
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    (tmp_path / "docs" / "guide" / "http.md").write_text("# http\n")
    (tmp_path / "docs" / "index.md").write_text("# docs\n")
    assert [p.relative_to(tmp_path).as_posix() for p in documents(tmp_path)] == [
        "README.md",
        "docs/guide/http.md",
        "docs/index.md",
    ]
