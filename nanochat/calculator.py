"""The chat model's calculator tool (the Engine runs it between <|python_start|> and <|python_end|>): arithmetic on
numbers and str.count, evaluated over a whitelisted AST, never eval, with bounds on the expression's length, the
exponent and the size of the result."""

import ast
import math
import operator
import re


BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR_CHARS = 256
MAX_EXPONENT = 100
MAX_INT_DIGITS = 1000


def _calc(node):
    if isinstance(node, ast.Expression):
        return _calc(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        value = _calc(node.operand)
        if isinstance(value, str):
            raise ValueError("arithmetic on a string")
        return UNARY_OPS[type(node.op)](value)
    if isinstance(node, ast.BinOp) and type(node.op) in BIN_OPS:
        left, right = _calc(node.left), _calc(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise ValueError("arithmetic on a string")
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        value = BIN_OPS[type(node.op)](left, right)
        if (isinstance(value, complex) or isinstance(value, float) and not math.isfinite(value)
                or isinstance(value, int) and value.bit_length() > MAX_INT_DIGITS * 3.33):
            raise ValueError("result out of range")
        return value
    # "strawberry".count("r"): the one method call allowed, on string literals only
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.func.value.value.count(node.args[0].value)
    raise ValueError(f"not allowed: {type(node).__name__}")


def use_calculator(expr):
    """Value of a calculator expression as a string (e.g. "12*(3+4)" -> "84"), or None for anything else."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr.strip())  # thousands separators: 1,234 -> 1234
    try:
        value = _calc(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ArithmeticError, TypeError, RecursionError):
        return None
    return None if isinstance(value, str) else str(value)
