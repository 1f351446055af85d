"""The fused kernels' C++ stays in the shape issue 17 gave it: one loop skeleton (csrc/fused_loop.h) whose
phases are short functions, with the statistic family and the cell chosen once at the entry point.

* every function (a constructor, a member function, a free function, PYBIND11_MODULE's body) of the C++
  sources is at most MAX_LINES lines, signature to closing brace, lambdas counted in their function;
* no runtime comparison of the family or the cell (``mode ==``, ``cell ==``) outside a TORCH_CHECK of the
  entry points: inside the loop they are template arguments (``if constexpr``).

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
