"""Request-target paths as the router and the backend both see them: `%2e` decoded and dot
segments resolved (RFC 3986 5.2.4); encoded slashes and backslashes refused."""

from __future__ import annotations


class BadPath(ValueError):
    """The path cannot be routed safely; the message says why (a 400)."""


def normalize_path(raw: str) -> str:
    """`raw` (origin-form, still percent-encoded) with dot segments resolved; raises BadPath.
    Plain paths cost a few substring checks."""
    if "\\" in raw:
        raise BadPath("backslashes are not allowed in the request path; use '/'")
    if "%" in raw:
        if "%2f" in raw or "%2F" in raw or "%5c" in raw or "%5C" in raw:
            raise BadPath("encoded slashes (%2F) and backslashes (%5C) are not allowed in "
                          "the request path; send the path unencoded")
        # An encoded dot is a dot (RFC 3986 6.2.2.2): resolve `%2e%2e` like `..`.
        raw = raw.replace("%2e", ".").replace("%2E", ".")
    if "/." not in raw or not raw.startswith("/"):
        return raw
    segments = raw.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/b/.." is "/a/": the last segment stays a directory
    return "/" + "/".join(out)
