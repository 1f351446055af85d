"""The fused kernels' C++ stays in the shape issue 17 gave it: one loop skeleton (csrc/fused_loop.h) whose
phases are short functions, with the statistic family and the cell chosen once at the entry point.

* every function (a constructor, a member function, a free function, PYBIND11_MODULE's body) of the C++
  sources is at most MAX_LINES lines, signature to closing brace, lambdas counted in their function;
* no runtime comparison of the family or the cell (``mode ==``, ``cell ==``) outside a TORCH_CHECK of the
  entry points: inside the loop they are template arguments (``if constexpr``);
* each statistic family is one header (``family_<name>.h``: its struct with its code, axis and statistics),
  listed in ``families.h``, with the codes the Python side passes (``fused._FAMILY``); the kernels name no
  family and compute no statistics themselves: they read the family's axis and call its functions.

The parser is a brace counter over the sources without comments and string literals: enough for this
code's style (one definition per statement; no braces in macros)."""

import os
import re

import pytest

from recnorm.kernels import fused

CSRC = os.path.join(os.path.dirname(fused.__file__), "csrc")
SOURCES = sorted(f for f in os.listdir(CSRC) if f.endswith((".cpp", ".h")))
MAX_LINES = 120


def _code_lines(text: str):
    """The lines without comments, string or character literals, or preprocessor directives."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)
    out = []
    for line in text.split("\n"):
        line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
        line = re.sub(r"'(\\.|[^'\\])'", "''", line)
        line = line.split("//", 1)[0]
        out.append("" if line.lstrip().startswith("#") else line)
    return out


def functions(text: str):
    """``[(signature, first line, number of lines)]`` of the function definitions in C++ source ``text``."""
    found, stack, pending, start = [], [], "", None
    for no, line in enumerate(_code_lines(text), 1):
        if re.fullmatch(r"\s*(public|private|protected)\s*:\s*", line):
            pending, start = "", None
            continue
        for ch in line:
            in_code = not stack or stack[-1][0] == "scope"  # namespace or class scope, not inside a function
            if ch == "{":
                if in_code:
                    head = pending.strip()
                    if "(" in head and not re.match(r"(namespace|enum|union)\b", head) and not re.search(r"\b(struct|class)\s+\w+\s*(final\s*)?(:[^(]*)?$", head):
                        stack.append(("function", start if start is not None else no, head))
                    elif re.search(r"\b(namespace|struct|class|union)\b", head) or head.startswith("extern"):
                        stack.append(("scope", no, head))
                    else:
                        stack.append(("other", no, head))
                    pending, start = "", None
                else:
                    stack.append(("block", no, ""))
            elif ch == "}":
                kind, first, head = stack.pop()
                if kind == "function":
                    found.append((" ".join(head.split())[:100], first, no - first + 1))
                if not stack or stack[-1][0] == "scope":
                    pending, start = "", None
            elif ch == ";" and in_code:
                pending, start = "", None
            elif in_code:
                if not ch.isspace() and start is None:
                    start = no
                pending += ch
        if (not stack or stack[-1][0] == "scope") and pending:
            pending += " "
    assert not stack, "unbalanced braces"
    return found


def test_the_parser_finds_functions_and_their_lengths():
    src = "namespace {\nstruct A {\n  int f(int x) {\n    if (x) {\n      return 1;\n    }\n    return 0;\n  }\n  int y = 0;\n};\n" \
          "template <typename T>\nvoid g(T t,\n       T u) {\n  auto h = [&] { return t; };\n}\n}  // namespace\n"
    assert [(s.split("(")[0], first, n) for s, first, n in functions(src)] == [("int f", 3, 6), ("template <typename T> void g", 11, 5)]


@pytest.mark.parametrize("name", SOURCES)
def test_every_function_is_short(name):
    with open(os.path.join(CSRC, name)) as f:
        found = functions(f.read())
    assert found or name.endswith(".h")
    too_long = [(sig, first, n) for sig, first, n in found if n > MAX_LINES]
    assert not too_long, f"{name}: functions over {MAX_LINES} lines: {too_long}"


@pytest.mark.parametrize("name", SOURCES)
def test_no_runtime_branch_on_the_family_or_the_cell(name):
    with open(os.path.join(CSRC, name)) as f:
        statements = " ".join(_code_lines(f.read())).replace("{", ";").replace("}", ";").split(";")
    runtime = [" ".join(s.split())[:120] for s in statements
               if re.search(r"\b(mode|cell)\s*[!=]=", s) and not s.strip().startswith("TORCH_CHECK")]
    assert not runtime, f"{name}: runtime comparisons of the family or the cell: {runtime}"


KERNELS = ("fused_lstm.cpp", "fused_gru_rnn.cpp")
FAMILY_HEADERS = sorted(f for f in SOURCES if re.fullmatch(r"family_\w+\.h", f))
# What the family headers define: the statistics a pass asks a family for. A kernel calling one of these
# directly (not through its family, F::...) computes a family's statistics itself.
STATISTICS = ("row_stats", "row_moments", "ln_rstd", "population_rstd", "bn_begin_step", "bn_columns", "BNSite", "BNStep")


def _read(name):
    with open(os.path.join(CSRC, name)) as f:
        return "\n".join(_code_lines(f.read()))


def _families():
    """``{struct name: (code, axis, name)}`` of the family headers, one struct each."""
    found = {}
    for header in FAMILY_HEADERS:
        text = _read(header)
        structs = re.findall(r"\bstruct\s+(\w+Family)\s*\{", text)
        assert len(structs) == 1, f"{header}: one family struct per header, found {structs}"
        code = re.search(r"static\s+constexpr\s+int64_t\s+kCode\s*=\s*(\d+)\s*;", text)
        axis = re.search(r"static\s+constexpr\s+Axis\s+kAxis\s*=\s*Axis::(\w+)\s*;", text)
        with open(os.path.join(CSRC, header)) as f:
            name = re.search(r'kName\s*=\s*"(\w+)"', f.read())
        assert code and axis and name, f"{header}: a family needs kCode, kAxis and kName"
        found[structs[0]] = (int(code.group(1)), axis.group(1), name.group(1))
    return found


def test_each_family_is_one_header_in_the_list_with_the_python_code():
    families = _families()
    assert set(families) == {"NoneFamily", "RowFamily", "StepBatchFamily"}
    listed = re.search(r"using\s+Families\s*=\s*FamilyList<([^>]*)>", _read("families.h")).group(1)
    assert sorted(n.strip() for n in listed.split(",")) == sorted(families)
    codes = [code for code, _, _ in families.values()]
    assert len(set(codes)) == len(codes), "two families share a code"
    assert {name: code for code, _, name in families.values()} == {n: fused._FAMILY[n] for _, _, n in families.values()}
    assert set(fused._FAMILY.values()) == set(codes)
    assert {axis for _, axis, _ in families.values()} == {"kNone", "kRow", "kBatch"}


@pytest.mark.parametrize("name", KERNELS)
def test_kernels_name_no_family_and_compute_no_statistics(name):
    text = _read(name)
    named = [f for f in _families() if re.search(rf"\b{f}\b", text)]
    assert not named, f"{name} names a family: {named}; it should read F::kAxis and call F's statistics"
    direct = [s for s in STATISTICS if re.search(rf"(?<!F::)\b{s}\b", text)]
    assert not direct, f"{name} computes a family's statistics itself: {direct}"
    assert re.search(r"\bF::group\(", text) and re.search(r"\bF::columns\(", text)


@pytest.mark.parametrize("header", FAMILY_HEADERS)
def test_a_family_header_names_no_kernel_and_no_other_family(header):
    text = _read(header)
    others = [f for f in _families() if f not in re.findall(r"\bstruct\s+(\w+Family)\b", text) and re.search(rf"\b{f}\b", text)]
    assert not others, f"{header} names {others}"
    assert not re.search(r"\b(Lstm|GruRnn)(Forward|Backward)\b", text)
