"""A small Go text/template interpreter with the Sprig and Helm functions the chart uses.

There is no helm binary in the test environment; this renders the chart's templates well enough
to check what they produce (names, base URL lists, the connections Secret). Semantics follow Go
and Helm where the chart depends on them: values numbers are float64 (Helm reads values as
JSON), `printf "%d"` of a float is Go's `%!d(float64=...)`, `until` wants an int, field access
on nil fails, `and`/`or` short-circuit, `{{-`/`-}}` trim whitespace, `$` is the data passed to
the template or `include`. Unknown functions raise. Not supported: `block`, `break`,
`continue`, `tpl`, range over an integer.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import yaml


class TemplateError(Exception):
    """A rendering error (Helm would fail too), or a `fail` call: its message."""


# ---- parsing ------------------------------------------------------------------------------
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:\\.|[^"\\])*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)"""
    r"""|(?P<decl>:=)|(?P<assign>=)|(?P<var>\$\w*)|(?P<field>(?:\.\w+)+|\.)"""
    r"""|(?P<ident>[A-Za-z_]\w*)|(?P<punct>[()|,]))"""
)


@dataclass
class Node:
    kind: str  # text | action | if | range | with
    text: str = ""
    pipe: Any = None
    body: list = field(default_factory=list)
    other: list = field(default_factory=list)  # the else branch


def _tokens(src: str) -> list[tuple[str, str, bool]]:
    """(kind, text, glued): glued = no space before it (a field chained onto a `)`)."""
    out, pos = [], 0
    while pos < len(src):
        if not src[pos:].strip():
            break
        m = _TOKEN.match(src, pos)
        if not m:
            raise TemplateError(f"cannot parse {src[pos:]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind) == pos))
        pos = m.end()
    return out


def _parse_pipe(tokens: list) -> dict:
    # A declaration first: `$x :=`, `$x =` or `$i, $v :=`.
    shape = " ".join(kind if kind != "punct" else text for kind, text, _ in tokens[:4])
    decl, op, i = [], None, 0
    if re.match(r"var (decl|assign)\b", shape):
        decl, op, i = [tokens[0][1]], tokens[1][0], 2
    elif shape == "var , var decl":
        decl, op, i = [tokens[0][1], tokens[2][1]], "decl", 4
    cmds, depth, start = [], 0, i
    for k in range(i, len(tokens)):
        t = tokens[k]
        if t[1] == "(":
            depth += 1
        elif t[1] == ")":
            depth -= 1
        elif t[1] == "|" and depth == 0:
            cmds.append(_parse_cmd(tokens[start:k]))
            start = k + 1
    cmds.append(_parse_cmd(tokens[start:]))
    return {"decl": decl, "op": op, "cmds": cmds}


def _parse_cmd(tokens: list) -> list:
    args, k = [], 0
    while k < len(tokens):
        kind, text, _ = tokens[k]
        if text == "(":
            depth, end = 1, k + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[end][1], 0)
                end += 1
            arg: tuple = ("pipe", _parse_pipe(tokens[k + 1 : end - 1]))
            k = end
            if k < len(tokens) and tokens[k][0] == "field" and tokens[k][2]:
                arg = ("chain", arg, tokens[k][1])
                k += 1
            args.append(arg)
            continue
        k += 1
        if kind == "var" and k < len(tokens) and tokens[k][0] == "field" and tokens[k][2]:
            args.append(("chain", (kind, text), tokens[k][1]))  # $x.a.b
            k += 1
            continue
        args.append((kind, text))
    return args


def parse(src: str) -> tuple[list, dict[str, list]]:
    """The template's nodes and the `define`s it contains."""
    defines: dict[str, list] = {}
    root: list = []
    stack = [("root", root, None)]
    pos, pending_trim = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if pending_trim:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            stack[-1][1].append(Node("text", text))
        pos, pending_trim = m.end(), bool(m.group(3))
        body = m.group(2).strip()
        if body.startswith("/*"):
            continue
        word = body.split(None, 1)[0] if body else ""
        rest = body[len(word) :].strip()
        if word == "define":
            name = json.loads(rest)
            defines[name] = []
            stack.append(("define", defines[name], None))
        elif word in ("if", "range", "with"):
            node = Node(word, pipe=_parse_pipe(_tokens(rest)))
            stack[-1][1].append(node)
            stack.append((word, node.body, node))
        elif word == "else":
            _, _, node = stack.pop()
            if rest.startswith("if "):  # else if: a nested if in the else branch
                inner = Node("if", pipe=_parse_pipe(_tokens(rest[3:])))
                node.other.append(inner)
                stack.append(("elif", [], node))
                stack.append(("if", inner.body, inner))
                continue
            stack.append(("else", node.other, node))
        elif word == "end":  # closes an if with all its `else if`s
            stack.pop()
            while stack[-1][0] == "elif":
                stack.pop()
        else:
            stack[-1][1].append(Node("action", pipe=_parse_pipe(_tokens(body))))
    text = src[pos:]
    if pending_trim:
        text = text.lstrip()
    if text:
        root.append(Node("text", text))
    return root, defines


# ---- values and functions -----------------------------------------------------------------
def go_values(value: Any) -> Any:
    """Values as Helm holds them: read through JSON, so every number is a float64."""
    if isinstance(value, dict):
        return {k: go_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [go_values(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _plain(value: Any) -> Any:
    """For toJson/toYaml: a float64 with an integral value marshals without a fraction."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def go_str(value: Any) -> str:
    """fmt's %v (with Helm's "<no value>" -> "")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value)
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_str(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, list):
        return "[" + " ".join(go_str(v) for v in value) + "]"
    return str(value)


def truth(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return value not in (None, 0, "") and not (isinstance(value, list | dict) and not value)


def _go_type(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float64", str: "string"}.get(type(value), "map")


def printf(fmt: str, *args: Any) -> str:
    args_iter = iter(args)

    def verb(m: re.Match) -> str:
        v = m.group(1)
        if v == "%":
            return "%"
        arg = next(args_iter)
        if v == "d":
            if isinstance(arg, int) and not isinstance(arg, bool):
                return str(arg)
            return f"%!d({_go_type(arg)}={go_str(arg)})"
        if v == "s" and isinstance(arg, bool | int | float):
            return f"%!s({_go_type(arg)}={go_str(arg)})"
        if v == "q":
            return json.dumps(str(arg), ensure_ascii=False)
        return go_str(arg)

    return re.sub(r"%([sdqv%])", verb, fmt)


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(float(value)) if value.strip() else 0
        except ValueError:
            return 0
    return int(value or 0)


def _to_string(value: Any) -> str:
    return "<nil>" if value is None else go_str(value)


def _until(count: Any) -> list[int]:
    if not isinstance(count, int) or isinstance(count, bool):
        raise TemplateError(f"until: wrong type for value; expected int; got {_go_type(count)}")
    return list(range(count))


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list):
            value = value[int(key)]
        else:
            raise TemplateError(f"index of untyped nil with {key!r}")
    return value


def _dig(*args: Any) -> Any:
    *keys, default, obj = args
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def _trunc(n: Any, s: str) -> str:
    n = int(n)
    if n < 0:
        return s[len(s) + n :] if len(s) + n > 0 else s
    return s[:n]


def _indent(n: Any, s: str) -> str:
    pad = " " * int(n)
    return pad + s.replace("\n", "\n" + pad)


def _print(*args: Any) -> str:
    out = ""
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += go_str(a)
    return out


def _required(msg: str, value: Any) -> Any:
    if value is None or value == "":
        raise TemplateError(msg)
    return value


def _fail(msg: str) -> None:
    raise TemplateError(msg)


def _from_json(text: str) -> Any:
    try:
        return go_values(json.loads(text))
    except ValueError as exc:
        return {"Error": str(exc)}


def _to_json(value: Any) -> str:
    text = json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=False).removesuffix("\n")


FUNCS: dict[str, Any] = {
    "append": lambda lst, v: [*(lst or []), v],
    "contains": lambda sub, s: sub in s,
    "default": lambda d, *v: v[0] if v and truth(v[0]) else d,
    "dict": lambda *kv: {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)},
    "dig": _dig,
    "empty": lambda v: not truth(v),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "fail": _fail,
    "first": lambda lst: lst[0] if lst else None,
    "fromJson": _from_json,
    "fromJsonArray": lambda s: _from_json(s) if s.strip().startswith("[") else [],
    "ge": lambda a, b: a >= b,
    "get": lambda d, k: d.get(k, ""),
    "gt": lambda a, b: a > b,
    "hasKey": lambda d, k: k in d,
    "hasPrefix": lambda p, s: s.startswith(p),
    "hasSuffix": lambda p, s: s.endswith(p),
    "indent": _indent,
    "index": _index,
    "int": _to_int,
    "int64": _to_int,
    "join": lambda sep, lst: sep.join(go_str(x) for x in lst or []),
    "le": lambda a, b: a <= b,
    "len": len,
    "list": lambda *items: list(items),
    "lookup": lambda *a: {},  # `helm template` and --dry-run: nothing in the cluster
    "lower": str.lower,
    "lt": lambda a, b: a < b,
    "ne": lambda a, b: a != b,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "not": lambda v: not truth(v),
    "print": _print,
    "printf": printf,
    "quote": lambda *a: " ".join(json.dumps(go_str(x), ensure_ascii=False) for x in a),
    "replace": lambda old, new, s: s.replace(old, new),
    "required": _required,
    "set": lambda d, k, v: (d.__setitem__(k, v), d)[1],
    "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest(),
    "splitList": lambda sep, s: s.split(sep),
    "toJson": _to_json,
    "toString": _to_string,
    "toYaml": _to_yaml,
    "trim": str.strip,
    "trimSuffix": lambda suf, s: s.removesuffix(suf),
    "trunc": _trunc,
    "until": _until,
    "upper": str.upper,
    "urlquery": lambda *a: urllib.parse.quote_plus("".join(go_str(x) for x in a), safe=""),
}


# ---- evaluation ---------------------------------------------------------------------------
_CONSTANTS = {"true": True, "false": False, "nil": None}


class Chart:
    """The templates of a chart directory, rendered against values (no subcharts)."""

    def __init__(self, chart_dir: Any, release: str = "lgt", namespace: str = "lgt") -> None:
        meta = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
        self.meta = {"Name": meta["name"], "Version": meta["version"]}
        self.meta["AppVersion"] = meta.get("appVersion", "")
        self.release = {"Name": release, "Namespace": namespace, "Service": "Helm"}
        self.defines: dict[str, list] = {}
        self.base = f"{meta['name']}/templates"
        for path in sorted((chart_dir / "templates").iterdir()):
            nodes, defines = parse(path.read_text())
            self.defines.update(defines)
            self.defines[f"{self.base}/{path.name}"] = nodes

    def context(self, values: dict, template: str = "") -> dict:
        """The root context (`$`) of a template rendered with these (merged) values."""
        return {
            "Values": go_values(values),
            "Release": self.release,
            "Chart": self.meta,
            "Template": {"BasePath": self.base, "Name": f"{self.base}/{template}"},
            "Capabilities": {"KubeVersion": {"Version": "v1.31.0"}},
        }

    def render(self, template: str, values: dict) -> str:
        """One template file (e.g. "vllm.yaml") with these values (already merged)."""
        return self.include(f"{self.base}/{template}", self.context(values, template))

    def include(self, name: str, data: Any) -> str:
        if name not in self.defines:
            raise TemplateError(f'no template "{name}"')
        out: list[str] = []
        self._run(self.defines[name], data, [{"$": data}], out)
        return "".join(out)

    # -- nodes --
    def _run(self, nodes: list, dot: Any, scopes: list[dict], out: list[str]) -> None:
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "action":
                value = self._pipe(node.pipe, dot, scopes)
                if not node.pipe["decl"]:
                    out.append(go_str(value))
            elif node.kind in ("if", "with"):
                inner = [*scopes, {}]
                value = self._pipe(node.pipe, dot, inner)
                if truth(value):
                    self._run(node.body, value if node.kind == "with" else dot, inner, out)
                else:
                    self._run(node.other, dot, [*scopes, {}], out)
            else:
                self._range(node, dot, scopes, out)

    def _range(self, node: Node, dot: Any, scopes: list[dict], out: list[str]) -> None:
        pipe = dict(node.pipe, decl=[])
        items = self._pipe(pipe, dot, scopes)
        pairs = (
            [(k, items[k]) for k in sorted(items)]
            if isinstance(items, dict)
            else list(enumerate(items or []))
        )
        if not pairs:
            self._run(node.other, dot, [*scopes, {}], out)
        names = node.pipe["decl"]
        for key, item in pairs:
            scope: dict = {}
            if len(names) == 1:
                scope[names[0]] = item
            elif len(names) == 2:
                scope[names[0]], scope[names[1]] = key, item
            self._run(node.body, item, [*scopes, scope], out)

    # -- pipelines --
    def _pipe(self, pipe: dict, dot: Any, scopes: list[dict]) -> Any:
        value, piped = None, False
        for cmd in pipe["cmds"]:
            value = self._cmd(cmd, dot, scopes, (value,) if piped else ())
            piped = True
        for name in pipe["decl"][:1]:
            if pipe["op"] == "decl":
                scopes[-1][name] = value
            else:
                next(s for s in reversed(scopes) if name in s)[name] = value
        return value

    def _cmd(self, cmd: list, dot: Any, scopes: list[dict], piped: tuple) -> Any:
        kind, text = cmd[0][0], cmd[0][1]
        if kind == "ident" and text not in _CONSTANTS:
            args = [lambda a=a: self._arg(a, dot, scopes) for a in cmd[1:]]
            args += [lambda v=v: v for v in piped]
            return self._call(text, args, dot)
        if len(cmd) > 1 or piped:
            raise TemplateError(f"can't give arguments to non-function {text}")
        return self._arg(cmd[0], dot, scopes)

    def _call(self, name: str, args: list, dot: Any) -> Any:
        if name in ("and", "or"):  # short-circuit, return the deciding operand
            value = None
            for get in args:
                value = get()
                if truth(value) == (name == "or"):
                    return value
            return value
        values = [get() for get in args]
        if name == "include":
            return self.include(*values)
        if name not in FUNCS:
            raise TemplateError(f'function "{name}" not defined')
        return FUNCS[name](*values)

    def _arg(self, arg: tuple, dot: Any, scopes: list[dict]) -> Any:
        kind = arg[0]
        if kind == "str":
            return json.loads(arg[1])
        if kind == "raw":
            return arg[1][1:-1]
        if kind == "num":
            return float(arg[1]) if "." in arg[1] else int(arg[1])
        if kind == "ident":
            if arg[1] in _CONSTANTS:
                return _CONSTANTS[arg[1]]
            return self._call(arg[1], [], dot)
        if kind == "var":
            for scope in reversed(scopes):
                if arg[1] in scope:
                    return scope[arg[1]]
            raise TemplateError(f"undefined variable {arg[1]}")
        if kind == "field":
            return _walk(dot, arg[1])
        if kind == "pipe":
            return self._pipe(arg[1], dot, scopes)
        if kind == "chain":
            return _walk(self._arg(arg[1], dot, scopes), arg[2])
        raise TemplateError(f"unexpected {arg[1]!r}")


def _walk(value: Any, path: str) -> Any:
    for key in (k for k in path.split(".") if k):
        if not isinstance(value, dict):
            raise TemplateError(f"nil pointer evaluating {go_str(value)!r}.{key}")
        value = value.get(key)
    return value
