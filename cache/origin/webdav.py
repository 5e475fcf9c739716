"""The WebDAV (RFC 4918) pieces the origin speaks: PROPFIND request bodies and the
207 Multi-Status answer, for the live properties every storage backend can supply."""

from __future__ import annotations

import email.utils
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import quote

DAV = "DAV:"
_D = "{DAV:}"
# The properties we can answer for any backend, in the order they are written.
LIVE = ("resourcetype", "getcontentlength", "getlastmodified", "getetag", "getcontenttype")
# A PROPFIND body names a few properties; anything bigger is not a client we serve.
MAX_BODY = 64 * 1024

ET.register_namespace("D", DAV)


class BadPropfind(ValueError):
    """The PROPFIND body is not a DAV:propfind document (400)."""


@dataclass
class PropRequest:
    """What a PROPFIND asks for: all properties, their names, or the listed ones."""

    kind: str = "allprop"  # allprop | propname | prop
    names: list[tuple[str, str]] = field(default_factory=list)  # (namespace, local name)


def parse_propfind(body: bytes) -> PropRequest:
    """An empty body means allprop (RFC 4918 section 9.1)."""
    if not body.strip():
        return PropRequest()
    if len(body) > MAX_BODY:
        raise BadPropfind(f"PROPFIND body larger than {MAX_BODY} bytes")
    # Entity declarations have no business in a PROPFIND; refusing them closes the
    # door on entity expansion tricks whatever the XML parser's own limits are.
    if b"<!ENTITY" in body or b"<!DOCTYPE" in body:
        raise BadPropfind("PROPFIND body must not contain a DOCTYPE or entities")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise BadPropfind(f"PROPFIND body is not well-formed XML: {e}") from None
    if root.tag != f"{_D}propfind":
        raise BadPropfind("PROPFIND body must be a DAV:propfind element")
    for child in root:
        if child.tag == f"{_D}allprop":
            return PropRequest()
        if child.tag == f"{_D}propname":
            return PropRequest("propname")
        if child.tag == f"{_D}prop":
            names = []
            for prop in child:
                if prop.tag.startswith("{"):
                    ns, _, local = prop.tag[1:].partition("}")
                else:
                    ns, local = "", prop.tag
                names.append((ns, local))
            return PropRequest("prop", names)
    raise BadPropfind("DAV:propfind must contain allprop, propname or prop")


@dataclass
class Resource:
    """One member of a Multi-Status answer."""

    path: str  # absolute, decoded ("/ns/dir/file")
    is_collection: bool
    size: int = 0
    mtime: float | None = None
    etag: str | None = None  # quoted, as in the ETag header

    @property
    def href(self) -> str:
        # Percent-encoded (RFC 4918 section 8.3); collections end with '/'.
        encoded = quote(self.path)
        return encoded + "/" if self.is_collection and not encoded.endswith("/") else encoded

    def value(self, name: str) -> str | ET.Element | None:
        """The property's text, an element (resourcetype), or None if it has none."""
        if name == "resourcetype":
            element = ET.Element(f"{_D}resourcetype")
            if self.is_collection:
                ET.SubElement(element, f"{_D}collection")
            return element
        if name == "getlastmodified":
            return email.utils.formatdate(self.mtime, usegmt=True) if self.mtime else None
        if name == "getcontentlength":
            # collections too: Pelican clients (pelicanfs find/walk) take int() of every
            # entry's length, as XrdHttp and Pelican origins always send one
            return "0" if self.is_collection else str(self.size)
        if self.is_collection:
            return None  # type and etag describe objects only
        if name == "getetag":
            return self.etag
        if name == "getcontenttype":
            return "application/octet-stream"
        return None


def multistatus(resources: list[Resource], request: PropRequest) -> bytes:
    root = ET.Element(f"{_D}multistatus")
    for res in resources:
        response = ET.SubElement(root, f"{_D}response")
        ET.SubElement(response, f"{_D}href").text = res.href
        found = ET.Element(f"{_D}prop")
        missing = ET.Element(f"{_D}prop")
        wanted = (
            [(DAV, n) for n in LIVE] if request.kind in ("allprop", "propname") else request.names
        )
        for ns, name in wanted:
            value = res.value(name) if ns == DAV else None
            if value is None:
                # allprop lists only what exists; an explicitly asked property that
                # does not exist is reported 404 in its own propstat.
                if request.kind == "prop":
                    ET.SubElement(missing, f"{{{ns}}}{name}" if ns else name)
                continue
            if request.kind == "propname":
                ET.SubElement(found, f"{_D}{name}")
            elif isinstance(value, ET.Element):
                found.append(value)
            else:
                ET.SubElement(found, f"{_D}{name}").text = value
        for prop, status in ((found, "HTTP/1.1 200 OK"), (missing, "HTTP/1.1 404 Not Found")):
            if len(prop) or (status.endswith("OK") and not len(missing)):
                propstat = ET.SubElement(response, f"{_D}propstat")
                propstat.append(prop)
                ET.SubElement(propstat, f"{_D}status").text = status
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body


def finite_depth_error() -> bytes:
    """RFC 4918 section 9.1: the precondition a server names when it refuses
    PROPFIND with Depth: infinity."""
    root = ET.Element(f"{_D}error")
    ET.SubElement(root, f"{_D}propfind-finite-depth")
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body
