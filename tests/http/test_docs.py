"""The API docs pages load everything from the server itself, so they work without internet access."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx
import pytest


class _Links(HTMLParser):
    """Every src and href of a page."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def _page_urls(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    # the OpenAPI document: Swagger UI's `url: '...'`, ReDoc's spec-url attribute
    spec = re.findall(r"url: '([^']+)'", html) + re.findall(r'spec-url="([^"]+)"', html)
    return parser.urls + spec


@pytest.mark.parametrize("page, asset_types", [("/docs", {"javascript", "css", "png"}), ("/redoc", {"javascript", "png"})])
def test_docs_pages_use_only_same_origin_assets_and_they_are_served(server, page, asset_types):
    response = httpx.get(server.url + page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", response.text, re.I), "the page names another host"
    urls = _page_urls(response.text)
    assert "/openapi.json" in urls
    seen_types = set()
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{url} is not same-origin"
        asset = httpx.get(server.url + url)
        assert asset.status_code == 200, (url, asset.status_code)
        assert len(asset.content) > 1000, url
        seen_types |= {t for t in ("javascript", "css", "png", "json") if t in asset.headers["content-type"]}
    assert asset_types <= seen_types


def test_an_unknown_docs_asset_is_a_404_in_the_error_shape(server):
    response = httpx.get(server.url + "/docs/assets/no-such-file.js")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
