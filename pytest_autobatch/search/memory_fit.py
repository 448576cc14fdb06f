"""Peak memory against batch, fitted to the probes that fit: w + a*b (+ q*b**2, q >= 0)."""

from __future__ import annotations

import math


class MemoryFit:
    """A least-squares fit of peak bytes against batch.

    ``curved``: the curvature is measured from the points (three at least; a concave fit means
    none, since memory per sample does not shrink); otherwise it is a line and curvature unknown.
    ``coefficients`` is None when the points give no usable fit (singular, or memory not growing).
    """

    def __init__(self, points: dict[int, int], *, curved: bool):
        self.curved = curved
        coefficients = least_squares(points, quadratic=True) if curved else None
        if coefficients is None or coefficients[2] < 0:
            coefficients = least_squares(points, quadratic=False)
        self.coefficients = coefficients
        if coefficients is not None and self.slope(max(points)) <= 0:
            self.coefficients = None

    def slope(self, batch: float) -> float:
        assert self.coefficients is not None
        _, linear, quadratic = self.coefficients
        return linear + 2 * quadratic * batch

    def limit(self, capacity: int) -> float | None:
        """The real batch at which fitted memory reaches ``capacity`` (None without a usable fit)."""
        if self.coefficients is None:
            return None
        constant, linear, quadratic = self.coefficients
        if quadratic > 0:
            discriminant = linear * linear + 4 * quadratic * (capacity - constant)
            if discriminant < 0:
                return None
            root = math.sqrt(discriminant)
            if linear > 0:  # the same root, in the form that does not cancel when curvature is tiny
                return 2 * (capacity - constant) / (linear + root)
            return (-linear + root) / (2 * quadratic)
        return (capacity - constant) / linear


def least_squares(points: dict[int, int], *, quadratic: bool) -> tuple[float, float, float] | None:
    """Least-squares polynomial (degree 1 or 2) through ``points``, in scaled units for conditioning."""
    scale_x = max(points)
    scale_y = max(points.values()) or 1
    degree = 3 if quadratic else 2
    xs = [b / scale_x for b in points]
    ys = [p / scale_y for p in points.values()]
    # Normal equations: sum x^(i+j) c_j = sum x^i y.
    matrix = [[sum(x ** (i + j) for x in xs) for j in range(degree)] for i in range(degree)]
    vector = [sum(x ** i * y for x, y in zip(xs, ys)) for i in range(degree)]
    solution = _solve(matrix, vector)
    if solution is None:
        return None
    if not quadratic:
        solution.append(0.0)
    constant, linear, square = solution
    return constant * scale_y, linear * scale_y / scale_x, square * scale_y / scale_x ** 2


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    size = len(vector)
    rows = [row[:] + [value] for row, value in zip(matrix, vector)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(rows[r][column]))
        if abs(rows[pivot][column]) < 1e-12:
            return None
        rows[column], rows[pivot] = rows[pivot], rows[column]
        for r in range(column + 1, size):
            factor = rows[r][column] / rows[column][column]
            for c in range(column, size + 1):
                rows[r][c] -= factor * rows[column][c]
    solution = [0.0] * size
    for r in reversed(range(size)):
        solution[r] = (rows[r][size] - sum(rows[r][c] * solution[c] for c in range(r + 1, size))) / rows[r][r]
    return solution


def fit_columns(columns: list[list[float]], values: list[float]) -> list[float] | None:
    """Least-squares coefficients of ``values`` over ``columns`` (each scaled for conditioning);
    None when the columns are not independent."""
    scales = [max(abs(x) for x in column) or 1.0 for column in columns]
    scaled = [[x / scale for x in column] for column, scale in zip(columns, scales)]
    scale_y = max(abs(y) for y in values) or 1.0
    ys = [y / scale_y for y in values]
    matrix = [[sum(a * b for a, b in zip(row, column)) for column in scaled] for row in scaled]
    vector = [sum(a * y for a, y in zip(row, ys)) for row in scaled]
    solution = _solve(matrix, vector)
    if solution is None:
        return None
    return [value * scale_y / scale for value, scale in zip(solution, scales)]
