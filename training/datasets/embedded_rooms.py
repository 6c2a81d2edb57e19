"""Embedded procedural indoor rooms: scene segmentation with no download (an S3DIS in miniature).

Every room is a box of random size (about 4-6 m square, 2.6-3.2 m high) with floor, ceiling and
walls, doors cut into the walls, columns, cabinets against the walls, tables and chairs (some around
the tables, some loose), each with random proportions and orientation. Points are sampled uniformly
on the visible surfaces at a per-room density, hidden surfaces (inside columns and cabinets, outside
the room) are removed, and sensor noise is added. Colours come from per-class palettes that overlap
across classes (white walls, white doors and white tables; wooden floors, doors, tables, chairs and
cabinets; columns painted like the walls), with per-room lighting and per-object and per-point jitter,
so colour helps but geometry is needed. Generation is deterministic in ``seed``; results are cached.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from sklearn.neighbors import KDTree

from training.datasets.base import Scene, SceneDataset, cache_root
from training.datasets.common import load_or_build

CLASSES = ["ceiling", "floor", "wall", "column", "door", "table", "chair", "cabinet"]
CEILING, FLOOR, WALL, COLUMN, DOOR, TABLE, CHAIR, CABINET = range(len(CLASSES))

WHITE, OFF_WHITE, BEIGE, LIGHT_GREY, GREY, DARK = (
    (0.87, 0.87, 0.84),
    (0.8, 0.78, 0.72),
    (0.78, 0.72, 0.6),
    (0.68, 0.68, 0.68),
    (0.5, 0.5, 0.52),
    (0.18, 0.18, 0.2),
)
WOOD, DARK_WOOD, BLUE, RED, GREEN = (
    (0.6, 0.45, 0.3),
    (0.42, 0.3, 0.2),
    (0.25, 0.32, 0.55),
    (0.6, 0.22, 0.2),
    (0.6, 0.7, 0.6),
)
PALETTES = {
    CEILING: [WHITE, OFF_WHITE, LIGHT_GREY],
    FLOOR: [WOOD, GREY, BLUE, BEIGE, LIGHT_GREY],
    WALL: [WHITE, OFF_WHITE, BEIGE, LIGHT_GREY, GREEN],
    DOOR: [WOOD, DARK_WOOD, WHITE, GREY],
    TABLE: [WOOD, WHITE, DARK, LIGHT_GREY],
    CHAIR: [DARK, BLUE, RED, WOOD, GREY],
    CABINET: [GREY, WOOD, OFF_WHITE, LIGHT_GREY],
}


def _rotation_z(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class _Room:
    """Accumulates surface samples of one room: points, labels and per-object colours."""

    def __init__(self, rng, density):
        self.rng = rng
        self.density = density
        self.points, self.labels, self.colors = [], [], []
        self.solids = []  # (center, half sizes, yaw): points of other surfaces inside are hidden

    def rect(self, origin, u, v, label, color):
        """Uniform samples on the parallelogram origin + a u + b v, a, b in [0, 1]."""
        area = np.linalg.norm(np.cross(u, v))
        n = self.rng.poisson(self.density * area)
        ab = self.rng.random((n, 2))
        self._add(np.asarray(origin) + ab[:, :1] * np.asarray(u) + ab[:, 1:] * np.asarray(v), label, color)

    def box(self, center, size, yaw, label, color, solid=False, bottom=False):
        """The faces of a box resting at ``center`` (bottom-face centre), rotated by ``yaw`` about z."""
        sx, sy, sz = size
        rot = _rotation_z(yaw)
        base = np.array(center, np.float64)
        corner = np.array([-sx / 2, -sy / 2, 0.0])
        ex, ey, ez = np.array([sx, 0, 0.0]), np.array([0, sy, 0.0]), np.array([0, 0, sz])
        faces = [
            (corner, ey, ez),
            (corner + ex, ey, ez),
            (corner, ex, ez),
            (corner + ey, ex, ez),
            (corner + ez, ex, ey),
        ]
        if bottom:
            faces.append((corner, ex, ey))
        for origin, u, v in faces:
            self.rect(base + rot @ origin, rot @ u, rot @ v, label, color)
        if solid:
            self.solids.append((base + np.array([0, 0, sz / 2]), np.array(size) / 2, yaw))

    def _add(self, points, label, color):
        self.points.append(points)
        self.labels.append(np.full(len(points), label, np.int32))
        self.colors.append(np.broadcast_to(np.asarray(color, np.float64), points.shape))

    def arrays(self):
        return np.concatenate(self.points), np.concatenate(self.labels), np.concatenate(self.colors)


def _footprint_free(placed, center, half, margin=0.05):
    """True when the disc bounding a footprint of half sizes ``half`` clears the discs already placed
    by ``margin`` metres (negative margins let bounding discs overlap a little)."""
    radius = np.hypot(*half)
    return all(np.hypot(*(center - c)) > radius + r + margin for c, r in placed)


def generate_room(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One room: points float32 [m, 3] (floor at z = 0), colors float32 [m, 3] in [0, 1], labels int32 [m]."""
    width, depth, height = rng.uniform(4.0, 6.0), rng.uniform(4.0, 6.0), rng.uniform(2.6, 3.2)
    room = _Room(rng, density=rng.uniform(250, 350))
    palette = {c: np.array(p[rng.integers(len(p))]) for c, p in PALETTES.items()}

    def color(label):
        return np.clip(palette[label] + rng.normal(0, 0.04, 3), 0, 1)

    room.rect((0, 0, 0), (width, 0, 0), (0, depth, 0), FLOOR, color(FLOOR))
    room.rect((0, 0, height), (width, 0, 0), (0, depth, 0), CEILING, color(CEILING))
    # Walls as (origin, along, inward normal); doors are carved out of them below.
    walls = [
        ((0, 0, 0), (width, 0, 0), (0, 1, 0)),
        ((width, depth, 0), (-width, 0, 0), (0, -1, 0)),
        ((0, depth, 0), (0, -depth, 0), (1, 0, 0)),
        ((width, 0, 0), (0, depth, 0), (-1, 0, 0)),
    ]
    wall_color = color(WALL)
    doors = {}  # wall index -> (start along the wall, width, height); at most one door per wall
    for w in rng.choice(4, size=rng.integers(1, 3), replace=False):
        length = np.linalg.norm(walls[w][1])
        door_w, door_h = rng.uniform(0.8, 1.0), rng.uniform(1.95, 2.15)
        doors[int(w)] = (rng.uniform(0.2, length - door_w - 0.2), door_w, door_h)
    for w, (origin, along, normal) in enumerate(walls):
        origin, along, normal = (np.array(a, np.float64) for a in (origin, along, normal))
        length = np.linalg.norm(along)
        unit = along / length
        end = 0.0
        if w in doors:
            # The wall is the strip before the door, the lintel above it and the strip after it.
            start, door_w, door_h = doors[w]
            room.rect(origin, start * unit, (0, 0, height), WALL, wall_color)
            room.rect(
                origin + start * unit + (0, 0, door_h),
                door_w * unit,
                (0, 0, height - door_h),
                WALL,
                wall_color,
            )
            # Door leaves stand a little proud of the wall plane, as their frames make them.
            offset = rng.uniform(0.01, 0.05) * normal
            room.rect(origin + start * unit + offset, door_w * unit, (0, 0, door_h), DOOR, color(DOOR))
            end = start + door_w
        room.rect(origin + end * unit, (length - end) * unit, (0, 0, height), WALL, wall_color)

    placed = []  # (center xy, radius) of furniture footprints
    # Columns: against a wall, in a corner or free-standing; often painted like the walls.
    for _ in range(rng.integers(0, 3)):
        size = (rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6), height)
        where = rng.integers(3)
        x = rng.uniform(0.5, width - 0.5)
        y = rng.uniform(0.5, depth - 0.5)
        if where == 0:
            y = size[1] / 2 - 0.05
        elif where == 1:
            x, y = width - size[0] / 2 + 0.05, depth - size[1] / 2 + 0.05
        c = np.clip(wall_color + rng.normal(0, 0.03, 3), 0, 1) if rng.random() < 0.6 else color(CABINET)
        room.box((x, y, 0), size, 0.0, COLUMN, c, solid=True)
        placed.append((np.array([x, y]), np.hypot(size[0], size[1]) / 2))
    # Cabinets and bookcases against the walls, backs slightly inside the wall (hidden).
    for _ in range(rng.integers(1, 4)):
        w = rng.integers(4)
        origin, along, normal = (np.array(a, np.float64) for a in walls[w])
        length = np.linalg.norm(along)
        cab_w, cab_d, cab_h = rng.uniform(0.6, 1.6), rng.uniform(0.35, 0.6), rng.uniform(0.8, 2.0)
        t = rng.uniform(cab_w / 2 + 0.05, length - cab_w / 2 - 0.05)
        center = origin + t * along / length + (cab_d / 2 - 0.02) * normal
        yaw = np.arctan2(along[1], along[0])
        if not _footprint_free(placed, center[:2], (cab_w / 2, cab_d / 2), margin=-0.1):
            continue
        room.box(center, (cab_w, cab_d, cab_h), yaw, CABINET, color(CABINET), solid=True)
        placed.append((center[:2], np.hypot(cab_w, cab_d) / 2))

    table_color = color(TABLE)
    chair_color = color(CHAIR)

    def chair(center_xy, yaw):
        seat_h, seat = rng.uniform(0.42, 0.48), rng.uniform(0.4, 0.5)
        rot = _rotation_z(yaw)
        base = np.array([center_xy[0], center_xy[1], 0.0])
        c = np.clip(chair_color + rng.normal(0, 0.03, 3), 0, 1)
        for dx in (-1, 1):
            for dy in (-1, 1):
                leg = base + rot @ np.array([dx * (seat / 2 - 0.03), dy * (seat / 2 - 0.03), 0])
                room.box(leg, (0.03, 0.03, seat_h - 0.04), yaw, CHAIR, c)
        room.box(base + (0, 0, seat_h - 0.04), (seat, seat, 0.04), yaw, CHAIR, c, bottom=True)
        back = base + rot @ np.array([-seat / 2 + 0.015, 0, seat_h])
        room.box(back, (0.03, seat, rng.uniform(0.35, 0.5)), yaw, CHAIR, c, bottom=True)

    num_tables = rng.integers(1, 3)
    for _ in range(20):
        if num_tables == 0:
            break
        top_w, top_d = rng.uniform(1.0, 2.0), rng.uniform(0.6, 1.0)
        top_h, thick = rng.uniform(0.72, 0.78), rng.uniform(0.03, 0.06)
        yaw = rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.15)
        center = np.array([rng.uniform(1.2, width - 1.2), rng.uniform(1.2, depth - 1.2)])
        # The footprint includes room for the chairs; tables that do not fit are tried elsewhere.
        if not _footprint_free(placed, center, (top_w / 2 + 0.3, top_d / 2 + 0.5), margin=-0.2):
            continue
        num_tables -= 1
        placed.append((center, np.hypot(top_w / 2 + 0.3, top_d / 2 + 0.5)))
        rot = _rotation_z(yaw)
        base = np.array([center[0], center[1], 0.0])
        room.box(base + (0, 0, top_h - thick), (top_w, top_d, thick), yaw, TABLE, table_color, bottom=True)
        for dx in (-1, 1):
            for dy in (-1, 1):
                leg = base + rot @ np.array([dx * (top_w / 2 - 0.06), dy * (top_d / 2 - 0.06), 0])
                room.box(leg, (0.05, 0.05, top_h - thick), yaw, TABLE, table_color)
        # Chairs along the long sides, facing the table (their backs away from it).
        for side in (-1, 1):
            for k in range(rng.integers(1, 3)):
                along = (k - 0.5) * 0.6 if top_w > 1.3 else 0.0
                local = np.array([along + rng.normal(0, 0.05), side * (top_d / 2 + rng.uniform(0.2, 0.4)), 0])
                xy = (base + rot @ local)[:2]
                chair(xy, yaw + side * np.pi / 2 + np.pi + rng.normal(0, 0.2))
    for _ in range(rng.integers(1, 5)):
        xy = np.array([rng.uniform(0.5, width - 0.5), rng.uniform(0.5, depth - 0.5)])
        if _footprint_free(placed, xy, (0.3, 0.3)):
            placed.append((xy, 0.45))
            chair(xy, rng.uniform(0, 2 * np.pi))

    points, labels, colors = room.arrays()
    # Hide what a scanner cannot see: outside the room, inside columns and cabinets.
    eps = 1e-6
    keep = np.all((points >= -eps) & (points <= np.array([width, depth, height]) + eps), axis=1)
    for center, half, yaw in room.solids:
        local = (points - center) @ _rotation_z(yaw)
        keep &= ~np.all(np.abs(local) < half - 0.005, axis=1)
    points, labels, colors = points[keep], labels[keep], colors[keep]
    # Lighting: a per-room gain and a soft gradient with height; then per-point colour noise.
    gain = rng.uniform(0.8, 1.1) * (1 + rng.uniform(-0.1, 0.1) * points[:, 2:] / height)
    colors = np.clip(colors * gain + rng.normal(0, 0.03, colors.shape), 0, 1)
    points = points + rng.normal(0, rng.uniform(0.003, 0.01), points.shape)
    return points.astype(np.float32), colors.astype(np.float32), labels


class EmbeddedRooms(SceneDataset):
    """Procedural indoor rooms, 8 classes; "validation" is the test rooms (as S3DIS uses Area 5)."""

    name = "EmbeddedRooms"
    label_names = list(CLASSES)
    has_colors = True
    version = 1

    def __init__(self, first_subsampling_dl=0.04, num_train=8, num_test=3, seed=0):
        if first_subsampling_dl <= 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        if num_train < 1 or num_test < 1:
            raise ValueError(f"num_train and num_test must be >= 1, got {num_train}, {num_test}")
        self.dl = float(first_subsampling_dl)
        self.counts = {"train": int(num_train), "test": int(num_test)}
        self.seed = int(seed)
        self._scenes: dict[str, list[Scene]] = {}

    @classmethod
    def from_config(cls, config):
        extra = dict(config.dataset.extra)
        return cls(
            config.model.first_subsampling_dl,
            extra.get("num_train", 8),
            extra.get("num_test", 3),
            extra.get("seed", 0),
        )

    def scenes(self, split: str) -> list[Scene]:
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        rooms = "train" if split == "train" else "test"
        if rooms not in self._scenes:
            self._scenes[rooms] = self._load_or_generate(rooms)
        return self._scenes[rooms]

    def _key(self, rooms):
        spec = json.dumps([self.name, self.version, self.dl, self.counts[rooms], self.seed, rooms])
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    def _load_or_generate(self, rooms):
        path = cache_root() / self.name / f"{rooms}_{self._key(rooms)}.npz"
        arrays = load_or_build(path, lambda: self._generate(rooms))
        scenes = []
        for i in range(self.counts[rooms]):
            points = arrays[f"points_{i}"]
            full = arrays[f"full_points_{i}"]
            scenes.append(
                Scene(
                    name=f"{rooms}_room_{i:02d}",
                    points=points,
                    colors=arrays[f"colors_{i}"],
                    labels=arrays[f"labels_{i}"],
                    tree=KDTree(points),
                    projection=arrays[f"projection_{i}"],
                    full_labels=arrays[f"full_labels_{i}"],
                    full_points_loader=lambda full=full: full,
                )
            )
        return scenes

    def _generate(self, rooms):
        import tf_custom_ops as ops

        arrays = {}
        stream = 0 if rooms == "train" else 1
        for i in range(self.counts[rooms]):
            # One stream per room: changing the number of rooms keeps the others.
            full, colors, labels = generate_room(np.random.default_rng([self.seed, stream, i]))
            sub_points, sub_colors, sub_labels = (
                t.numpy() for t in ops.grid_subsampling(full, self.dl, features=colors, labels=labels)
            )
            projection = KDTree(sub_points).query(full, return_distance=False)[:, 0]
            arrays.update(
                {
                    f"points_{i}": sub_points.astype(np.float32),
                    f"colors_{i}": np.clip(sub_colors, 0, 1).astype(np.float32),
                    f"labels_{i}": sub_labels.astype(np.int32),
                    f"full_points_{i}": full,
                    f"full_labels_{i}": labels,
                    f"projection_{i}": projection.astype(np.int32),
                }
            )
        return arrays
