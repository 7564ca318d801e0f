"""A scripted expert for CALVIN subtasks, driven by the simulator's privileged state.

    env = CalvinEnv(image_size=None)
    env.reset(robot_obs, scene_obs)
    expert = CalvinExpert(env)
    for subtask in chain:
        env.start_subtask(subtask, INSTRUCTIONS[subtask])
        expert.reset(subtask)                  # plans from the scene as it is now
        while not expert.done:
            obs, info = env.step(expert.act())

The hand points down throughout (roll and pitch are never commanded; the
target orientation keeps the home pose's); only its yaw turns, to line the
fingers up with a block. A plan is a list of segments, each a target that is
re-read from the scene at every step (a handle moves with its joint, a block
with the hand), a gripper command and an end condition. Between tasks the
hand travels at a safe height (rise, cross, descend) so that a chain's next
subtask starts from wherever the last one ended.

Control (the lessons of :mod:`fast_dvla.envs.libero_expert` apply: the
actions are later cloned, so they must be a smooth function of what a policy
sees): the position command is proportional to the tcp's error, with a floor
on its largest component while a waypoint is still out of reach, so that the
hand never creeps; the gripper is exactly +1 or -1. calvin_env adds each
action (x 0.02 m) to a target pose that the IK follows with about one step of
lag (measured: a +1 step moves the tcp 1.5-1.9 cm the step after). A gain of
10 per metre decays a 10 cm error monotonically in ~10 steps; 20 and above
overshoot by 3-6 mm and ring (sign flips of the command), 10 does not.

Geometry (measured on ``calvin_scene_D`` by ray casts against the table's
links, see the constants below; the table is scaled by 0.8 in the scene): the
drawer handle is a bar along x in front of the drawer face, the slider handle
a 4 cm wide vertical bar on the slanted sliding door, the switch a round bar
along x that slides along (0, 0.5, 0.866) (60 degrees up the slope), the
button a disc on the table pressed straight down. The fingertips reach 2 cm
below the tcp and the hand's palm starts 6.4 cm above it; the fingers close
along world x at the home yaw (1.50 rad) and take 3 steps to close on nothing.

Blocks: ``lift_*_block_table`` hovers 5 cm above the block with the fingers
turned to its yaw (mod pi), goes down to 1.2 cm above its centre, closes and
lifts; ``place_in_slider`` / ``place_in_drawer`` / ``stack_block`` find the
held block from calvin_env's contacts, carry it at CARRY_Z (into the slider
cabinet: first to the opening's x in front of the door, then back along y),
turn it so that its long axis runs along y (stack: along the lower block's),
lower it until it is 1.2 cm above its support or rides up in the fingers,
open and back up. Every plan rises before crossing (opening the gripper unless
it carries a block), so it starts from wherever a chain's previous subtask
ended at the oracle's success.

Measured (``scripts/calvin_expert_check.py``, 20 initial conditions each,
block yaws varied by the conditions' seeds): all 14 COVERED subtasks 20/20;
80 chains (``--chains 80 --seed 0``, each subtask ended at the oracle's
success, at most 360 steps): average length 4.90, 5/5 in 96%. Weak point:
the turn_off_lightbulb approach (tcp 0.646 over y 0.068) is at the edge of the
reach, the hand creeps there and the target pose leads by up to ~1 m when the
light goes off; the subtask after it inherits that lead (all 3 chain failures
came right after it: open_drawer twice, place_in_slider once).
"""
from __future__ import annotations

import math

import numpy as np

# --- control ------------------------------------------------------------------------------------
POS_GAIN = 10.0          # action units per metre (see the module docstring)
YAW_GAIN = 3.0           # action units per radian of yaw error (an action unit turns 0.05 rad)
MAX_YAW_ACTION = 1.0
MIN_APPROACH = 0.2       # floor on the largest position command while a waypoint is out of reach (4 mm/step)
# No anti-windup: where the hand cannot follow (pressing on a handle, or near the switch at the edge of
# the arm's reach) the accumulated target runs ahead of the tcp (measured: up to 15 cm while crossing to
# the switch). Clamping that lead to 3-8 cm was tried: the switch then no longer moved (the lead is the
# push), so the expert relies on the end conditions (joint states) and the PHASE_LIMIT instead.
TOL = 0.006              # metres: a waypoint is reached
YAW_TOL = 0.05           # radians: the yaw is lined up
HOME_YAW = 1.50          # the tcp's yaw at CALVIN's home pose: fingers close along world x
SAFE_Z = 0.60            # travel height of the tcp: the fingertips (2 cm lower) clear the blocks,
#                          the switch (top 0.63 when on) and the slider's handle (top 0.64)
FINGER_BELOW_TCP = 0.02  # the fingertips reach this far below the tcp

# --- scene geometry (calvin_scene_D; world frame, metres) ----------------------------------------
# Drawer: joint state d in [0, 0.22] (open towards -y). Face at y = -0.182 - d; the handle bar spans
# y [-0.262, -0.240] - d, z [0.335, 0.381], x [0.08, 0.28]. The closed fingers hook into the gap
# between bar and face; the palm must stay in front of the table top's edge (y -0.181, z 0.44),
# which a tcp at y <= -0.226 - d does (the palm reaches 4.5 cm behind the tcp).
DRAWER_X = 0.18
DRAWER_HOOK_Y = -0.227   # + (-d)
DRAWER_HOOK_Z = 0.365
DRAWER_OPEN_TO = 0.20    # the oracle wants a change of 0.12; range 0 - 0.22
DRAWER_CLOSE_TO = 0.02
# Slider: state s in [0, 0.28], moving towards -x ("left"). Its handle spans x [0.02, 0.06] - s and
# protrudes from the door to y -0.028 at z 0.50-0.52. Open fingers (8 cm apart) straddle it.
SLIDER_HANDLE_X = 0.04   # + (-s)
SLIDER_Y = -0.012
SLIDER_Z = 0.515
SLIDER_LEFT_TO = 0.25    # oracle: a change of 0.15
SLIDER_RIGHT_TO = 0.03
# Switch: state w in [0, 0.088], the lightbulb is on while w > 0.044. Its bar's front is at
# (y 0.003, z 0.52) at w = 0; the bar moves along SWITCH_AXIS by w.
SWITCH_X = 0.30
SWITCH_AXIS = np.array([0.0, 0.5, math.sqrt(3) / 2])
SWITCH_BAR = np.array([0.30, 0.020, 0.528])  # bar centre at w = 0 (radius ~1.8 cm)
SWITCH_ON_TO = 0.075
# Pushing it on purely along the axis failed in chains (3 of 18) that reached the bar from another arm
# posture (after open_drawer, the tcp 2 cm off in x): the hand rose over the bar's front with the bar
# stuck at w 0.025. Aiming the stroke's end 2 cm further into the bar (+y) keeps the fingers on it.
SWITCH_PRESS_IN = np.array([0.0, 0.02, 0.0])
SWITCH_OFF_TO = 0.030   # pressing from above stalls near 0.02 (the fingers meet the slope)
# Button: a disc of radius ~3.5 cm centred at (-0.12, -0.12), top at z 0.485, pressed down;
# it toggles the led when its state passes 0.01 (range 0.02).
BUTTON_XY = np.array([-0.12, -0.12])
BUTTON_TOP = 0.485
BUTTON_PRESS = 0.015     # push the top down by this much (past the 0.01 trigger)

# Blocks: 4 x 4 cm in section, 5.6 / 4 / 8 cm long (red, blue, pink); at yaw pi/2 the long axis lies
# along world y (measured: the red block's AABB at yaw 1.44 spans 4.6 cm in x, 6.0 cm in y). A tcp yaw
# equal to the block's (mod pi) closes the fingers across the 4 cm side.
BLOCK_HALF = 0.02        # half the height (and width) of a block
GRASP_ABOVE = 0.012      # tcp above a block's centre to grasp it: the fingertips end 0.8 cm below it
HOVER = 0.05             # settle (position and yaw) this far above the grasp before going down: a hand
#                          arriving with its target still leading (after the switch, at the edge of the
#                          reach) came down beside a block and pushed it away
LIFT_TO = 0.09           # raise the tcp this far above the grasp (the oracle wants the block up > 0.05)
CARRY_Z = 0.62           # travel height of the tcp with a block in hand: the block's bottom (3.2 cm
#                          below the tcp) clears the slider's door (top 0.61-0.62 at y 0.03-0.12)
DROP = 0.012             # release a block with its bottom this far above the surface it lands on
TABLE_TOP = 0.44
SLIP = 0.006             # a held block that rides this far up in the fingers has landed: release it
# Slider cabinet: its floor (plank_link) at z 0.441 spans x [-0.345, 0.195], y [0.02, 0.125] open from
# above; the door covers x [-0.10, 0.195] - s (ray casts at s = 0). A block goes in the middle of the
# uncovered part (the hand, 20 cm along the finger axis, must fit between door and wall).
CABINET_X = (-0.345, 0.195)
DOOR_X = (-0.10, 0.195)  # + (-s)
CABINET_Y = 0.075
CABINET_FLOOR = 0.441
CABINET_MARGIN = 0.07    # keep a block's centre this far inside the uncovered part
CABINET_CLEAR = 0.065    # ... and this far from a block already there (both are 4 cm wide along x)
CABINET_FRONT_Y = -0.03  # carry a block to the opening's x in front of the door (its slope rises from
#                          z 0.47 at y 0.01 to 0.64 at y 0.11), then back into the opening
# Drawer: its floor (drawer_link) at z 0.342, x [0.05, 0.37]; open from above between the table top's
# edge (y -0.19) and the inner face of its front wall (y -0.16 - d).
DRAWER_FLOOR = 0.342
DRAWER_PLACE_X = 0.21

PHASE_LIMIT = 80         # steps: a segment whose end condition never comes is given up on
CLOSE_MAX = 10           # steps of closing before lifting regardless
OPEN_STEPS = 4

BLOCK_INDEX = {"red": 6, "blue": 12, "pink": 18}  # offsets of each block's pos3+euler3 in scene_obs
SCENE_SLIDER, SCENE_DRAWER, SCENE_BUTTON, SCENE_SWITCH = 0, 1, 2, 3


def wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def wrap_half(angle: float) -> float:
    """``angle`` modulo pi, in [-pi/2, pi/2): a block looks the same turned by half a turn."""
    return (angle + math.pi / 2) % math.pi - math.pi / 2


class Segment:
    """One leg of a plan: ``target(expert) -> xyz``, a gripper command, ``until(expert) -> bool``."""

    def __init__(self, name, target, gripper, until=None, yaw=None, approach=True, limit=PHASE_LIMIT):
        self.name, self.target, self.gripper, self.until = name, target, gripper, until
        self.yaw, self.approach, self.limit = yaw, approach, limit


class CalvinExpert:
    """Stateful scripted expert for :class:`~fast_dvla.envs.calvin_env.CalvinEnv`.

    ``reset(subtask)`` plans from the current scene (call it after
    ``env.start_subtask``); ``act()`` once per step until ``done``. ``act``
    accepts (and ignores) the policy observation so that the expert drops into
    a policy's rollout loop; it reads ``env.raw_obs`` (the latest state).
    """

    def __init__(self, env):
        self.env = env
        self.subtask = None
        self.done = True
        self.segments: list[Segment] = []

    # --- state ----------------------------------------------------------------------------------
    @property
    def tcp(self) -> np.ndarray:
        return np.asarray(self.env.raw_obs["robot_obs"][:3], dtype=np.float64)

    @property
    def yaw(self) -> float:
        return float(self.env.raw_obs["robot_obs"][5])

    @property
    def width(self) -> float:
        return float(self.env.raw_obs["robot_obs"][6])

    def scene(self, i: int) -> float:
        return float(self.env.raw_obs["scene_obs"][i])

    def block_pos(self, color: str) -> np.ndarray:
        i = BLOCK_INDEX[color]
        return np.asarray(self.env.raw_obs["scene_obs"][i:i + 3], dtype=np.float64)

    def block_yaw(self, color: str) -> float:
        return float(self.env.raw_obs["scene_obs"][BLOCK_INDEX[color] + 5])

    # --- planning -------------------------------------------------------------------------------
    def reset(self, subtask: str, obs: dict | None = None) -> None:
        """Plan ``subtask`` from the environment's current state."""
        if not self.env.raw_obs:
            raise RuntimeError("reset the environment before the expert")
        self.subtask = subtask
        planner = getattr(self, "_plan_" + subtask, None)
        if planner is None:
            for prefix in ("lift_", "push_", "rotate_"):
                if subtask.startswith(prefix) and subtask != "push_into_drawer":
                    planner = getattr(self, "_plan_" + prefix.rstrip("_"))
        if planner is None:
            raise ValueError(f"CalvinExpert has no plan for {subtask!r}; it covers {COVERED}")
        self.segments = list(planner())
        self.index = 0
        self.done = False
        self._start_segment()

    def _start_segment(self):
        self.steps = 0
        self._last_width = None

    def _travel(self, xyz_fn, gripper, yaw=None, name="travel", until=None, rise_gripper=1, safe_z=SAFE_Z,
                front_y=None):
        """Rise to ``safe_z`` (unless already over the goal), cross at that height, then descend onto
        ``xyz_fn()``: three segments whose targets follow the goal as it moves. The rise opens the
        gripper (``rise_gripper``) unless the subtask carries a block: a chain's previous subtask may
        have left the fingers around a block just released, or hooked in a handle. With ``front_y``
        the crossing goes first to the goal's x at y <= ``front_y``, then straight back along y (into
        the slider cabinet: a block carried diagonally catches on the slanted door)."""
        def over(e):
            return np.linalg.norm((xyz_fn(e) - e.tcp)[:2]) < 0.02

        def height(e):  # above a high goal too (the switch's bar when on: top at 0.62)
            return max(safe_z, xyz_fn(e)[2] + 0.02)

        def up_target(e):
            return np.array([e.tcp[0], e.tcp[1], max(height(e), e.tcp[2])])

        def cross_target(e):
            g = xyz_fn(e)
            return np.array([g[0], g[1], height(e)])

        def front_target(e):
            g = xyz_fn(e)
            return np.array([g[0], min(g[1], front_y), height(e)])

        def over_front(e):
            return np.linalg.norm((front_target(e) - e.tcp)[:2]) < 0.02 or over(e)

        front = [] if front_y is None else [
            Segment(name + ":front", front_target, gripper, until=over_front, yaw=yaw)]
        return [
            Segment(name + ":rise", up_target, rise_gripper, until=lambda e: over(e) or e._near(up_target(e)), yaw=yaw),
            *front,
            Segment(name + ":cross", cross_target, gripper, until=lambda e: over(e) and e._yaw_ok(yaw), yaw=yaw),
            Segment(name + ":descend", xyz_fn, gripper, yaw=yaw,
                    until=None if until is None else lambda e: until(e) or (e._near(xyz_fn(e)) and e._yaw_ok(yaw))),
        ]

    def _retreat(self, gripper=1, height=0.08):
        """Back up (and away): the next subtask of a chain starts from here."""
        start = {}

        def target(e):
            if "p" not in start:
                start["p"] = e.tcp.copy()
            p = start["p"]
            return np.array([p[0], p[1], max(p[2] + height, min(SAFE_Z, p[2] + 0.15))])
        return [Segment("retreat", target, gripper)]

    # articulated objects ---------------------------------------------------------------------------
    def _drawer_hook(self, e):
        d = e.scene(SCENE_DRAWER)
        return np.array([DRAWER_X, DRAWER_HOOK_Y - d, DRAWER_HOOK_Z])

    def _plan_drawer(self, to: float, opening: bool):
        def goal(e):
            return np.array([DRAWER_X, DRAWER_HOOK_Y - to, DRAWER_HOOK_Z])

        def moved(e):
            d = e.scene(SCENE_DRAWER)
            return d >= to if opening else d <= to
        return [*self._travel(self._drawer_hook, -1, HOME_YAW),
                Segment("pull" if opening else "push", goal, -1, until=moved, yaw=HOME_YAW),
                *self._retreat(-1, height=0.2)]  # straight up: neither the bar nor the face is above the fingers

    def _plan_open_drawer(self):
        return self._plan_drawer(DRAWER_OPEN_TO, True)

    def _plan_close_drawer(self):
        return self._plan_drawer(DRAWER_CLOSE_TO, False)

    def _slider_grip(self, e):
        s = e.scene(SCENE_SLIDER)
        return np.array([SLIDER_HANDLE_X - s, SLIDER_Y, SLIDER_Z])

    def _plan_slider(self, to: float):
        left = to > self.scene(SCENE_SLIDER)

        def goal(e):
            return np.array([SLIDER_HANDLE_X - to, SLIDER_Y, SLIDER_Z])

        def moved(e):
            s = e.scene(SCENE_SLIDER)
            return s >= to if left else s <= to
        return [*self._travel(self._slider_grip, 1, HOME_YAW),
                Segment("slide", goal, 1, until=moved, yaw=HOME_YAW),
                *self._retreat(1, height=0.1)]

    def _plan_move_slider_left(self):
        return self._plan_slider(SLIDER_LEFT_TO)

    def _plan_move_slider_right(self):
        return self._plan_slider(SLIDER_RIGHT_TO)

    def _switch_bar(self, e):
        return SWITCH_BAR + SWITCH_AXIS * e.scene(SCENE_SWITCH)

    def _plan_switch(self, on: bool):
        to = SWITCH_ON_TO if on else SWITCH_OFF_TO
        # on: the closed fingers come down just in front of the bar, touching its front, and push it
        # up the slope (+y pushes it, the hand rises with it); off: they press on its top and follow
        # it down the slope. Both bars lie at the edge of the arm's reach, where the hand follows its
        # target slowly: approaches placed further from the bar (to push it only along the axis)
        # passed over it before the hand's lagging y motion made contact.
        offset = np.array([0.0, -0.030, -0.012]) if on else np.array([0.0, 0.004, 0.022 + FINGER_BELOW_TCP])
        overshoot = 0.01 if on else -0.02  # along the axis past ``to``: the stroke ends on the joint state

        def contact(e):
            return e._switch_bar(e) + offset

        def goal(e):  # on: also pressed into the bar (+y), or the fingers ride up over its front
            return SWITCH_BAR + SWITCH_AXIS * (to + overshoot) + offset + (SWITCH_PRESS_IN if on else 0.0)

        def moved(e):
            w = e.scene(SCENE_SWITCH)
            return w >= to if on else w <= to
        return [*self._travel(contact, -1, HOME_YAW, until=moved if on else None),
                Segment("switch", goal, -1, until=moved, yaw=HOME_YAW),
                Segment("back", lambda e: e._switch_bar(e) + offset + np.array([0, -0.03, 0]), -1, yaw=HOME_YAW),
                *self._retreat(-1, height=0.06)]

    def _plan_turn_on_lightbulb(self):
        return self._plan_switch(True)

    def _plan_turn_off_lightbulb(self):
        return self._plan_switch(False)

    def _plan_button(self):
        top = np.array([*BUTTON_XY, BUTTON_TOP + FINGER_BELOW_TCP + 0.01])
        press = np.array([*BUTTON_XY, BUTTON_TOP + FINGER_BELOW_TCP - BUTTON_PRESS - 0.005])
        return [*self._travel(lambda e: top, -1, HOME_YAW),
                Segment("press", lambda e: press, -1, yaw=HOME_YAW,
                        until=lambda e: e.scene(SCENE_BUTTON) > 0.01 + 0.004),
                *self._retreat(-1, height=0.08)]

    def _plan_turn_on_led(self):
        return self._plan_button()

    def _plan_turn_off_led(self):
        return self._plan_button()


    # blocks --------------------------------------------------------------------------------------
    def block_colors_on_table(self):
        return [c for c in BLOCK_INDEX if abs(self.block_pos(c)[2] - (TABLE_TOP + BLOCK_HALF)) < 0.01
                and self.block_pos(c)[1] < 0.0 and abs(self.block_pos(c)[0]) < 0.45]

    def held_block(self) -> str:
        """The block in the hand: the one touching the robot (calvin_env's contacts), else the nearest."""
        info = self.env.scene_info()
        robot = info["robot_info"]["uid"]
        touching = [c for c in BLOCK_INDEX
                    if robot in {k[2] for k in info["scene_info"]["movable_objects"][f"block_{c}"]["contacts"]}]
        if len(touching) == 1:
            return touching[0]
        candidates = touching or list(BLOCK_INDEX)
        return min(candidates, key=lambda c: np.linalg.norm(self.block_pos(c) - self.tcp))

    def _grasp_yaw(self, block_yaw: float) -> float:
        """The tcp yaw lining the fingers up across a block: its yaw modulo pi, nearest the home yaw
        (keeps the wrist in its range over a chain)."""
        return HOME_YAW + wrap_half(block_yaw - HOME_YAW)

    def _carry_yaw(self, color: str, block_yaw_goal: float) -> float:
        """The tcp yaw that turns the held block to ``block_yaw_goal`` (mod pi)."""
        return self.yaw + wrap_half(block_yaw_goal - self.block_yaw(color))

    def _plan_lift(self):
        color = self.subtask.split("_")[1]
        yaw = self._grasp_yaw(self.block_yaw(color))
        start = {}

        def grasp(e):
            return e.block_pos(color) + np.array([0.0, 0.0, GRASP_ABOVE])

        def up(e):  # straight up from where the grasp closed
            if "p" not in start:
                start["p"] = e.tcp.copy()
            return start["p"] + np.array([0.0, 0.0, LIFT_TO])
        def hover(e):
            return grasp(e) + np.array([0.0, 0.0, HOVER])
        return [*self._travel(hover, 1, yaw),
                Segment("descend", grasp, 1, yaw=yaw),
                Segment("close", grasp, -1, until=lambda e: e._closed(), yaw=yaw, limit=CLOSE_MAX),
                Segment("lift", up, -1, yaw=yaw)]

    def _closed(self) -> bool:
        """The fingers have stopped closing (on a block: the width settles at ~4 cm)."""
        last, self._last_width = self._last_width, self.width
        return self.steps >= 3 and last is not None and abs(self.width - last) < 0.001

    def _place(self, color, block_goal_fn, yaw, name, front_y=None):
        """Carry the held ``color`` block so that its centre reaches ``block_goal_fn()``, release it and
        back straight up. The target is the tcp shifted by the block's error, so a block that sits
        off-centre in the fingers still lands on its goal."""
        def target(e):
            return e.tcp + (block_goal_fn(e) - e.block_pos(color))
        grip = {"offset": self.block_pos(color)[2] - self.tcp[2]}

        def landed(e):  # the block rests on something: it rides up in the fingers as the hand goes on
            return e.block_pos(color)[2] - e.tcp[2] > grip["offset"] + SLIP
        release = {}

        def open_spot(e):
            if "p" not in release:
                release["p"] = e.tcp.copy()
            return release["p"]
        return [*self._travel(target, -1, yaw, rise_gripper=-1, safe_z=CARRY_Z, front_y=front_y, until=landed),
                Segment("release", open_spot, 1, yaw=yaw, limit=OPEN_STEPS,
                        until=lambda e: e.width > 0.075),
                *self._retreat(1, height=0.12)]

    def _plan_place_in_slider(self):
        color = self.held_block()
        s = self.scene(SCENE_SLIDER)
        left = (CABINET_X[0], DOOR_X[0] - s)   # uncovered part left of the door
        right = (DOOR_X[1] - s, CABINET_X[1])  # ... and right of it
        lo, hi = max(left, right, key=lambda r: r[1] - r[0])
        # a block may already sit in the open half (the preconditions allow it): the spot furthest from
        # the blocks in the cabinet, as near the middle as that allows (the hand barely fits at the middle)
        inside = [self.block_pos(c)[0] for c in BLOCK_INDEX if c != color
                  and self.block_pos(c)[1] > CABINET_Y - 0.06
                  and abs(self.block_pos(c)[2] - CABINET_FLOOR - BLOCK_HALF) < 0.02]
        spots = np.linspace(lo + CABINET_MARGIN, hi - CABINET_MARGIN, 21)
        clear = [min([CABINET_CLEAR] + [abs(x - b) for b in inside]) for x in spots]
        x = max(zip(clear, -np.abs(spots - (lo + hi) / 2), spots))[2]
        goal = np.array([x, CABINET_Y, CABINET_FLOOR + BLOCK_HALF + DROP])
        # long axis along y: through the opening (10 cm deep in y, 24 cm wide in x) with the hand
        # (20 cm along the finger axis) across it
        return self._place(color, lambda e: goal, self._carry_yaw(color, math.pi / 2), "slider",
                           front_y=CABINET_FRONT_Y)

    def _plan_place_in_drawer(self):
        color = self.held_block()

        def goal(e):
            d = e.scene(SCENE_DRAWER)
            return np.array([DRAWER_PLACE_X, -0.175 - d / 2, DRAWER_FLOOR + BLOCK_HALF + DROP])
        return self._place(color, goal, self._carry_yaw(color, math.pi / 2), "drawer")

    def _plan_stack_block(self):
        color = self.held_block()
        others = [c for c in self.block_colors_on_table() if c != color] or [c for c in BLOCK_INDEX if c != color]
        base = min(others, key=lambda c: np.linalg.norm(self.block_pos(c)[:2] - self.tcp[:2]))

        def goal(e):
            return e.block_pos(base) + np.array([0.0, 0.0, 2 * BLOCK_HALF + DROP])
        return self._place(color, goal, self._carry_yaw(color, self.block_yaw(base)), "stack")

    # --- control --------------------------------------------------------------------------------
    def _near(self, target) -> bool:
        return float(np.linalg.norm(np.asarray(target) - self.tcp)) < TOL

    def _yaw_ok(self, yaw) -> bool:
        return yaw is None or abs(wrap(yaw - self.yaw)) < YAW_TOL

    def _move(self, target, gripper: float, yaw=None, approach=True) -> np.ndarray:
        action = np.zeros(7)
        err = np.asarray(target, dtype=np.float64) - self.tcp
        command = err * POS_GAIN
        largest = float(np.abs(command).max())
        if approach and np.linalg.norm(err) >= TOL and 0 < largest < MIN_APPROACH:
            command *= MIN_APPROACH / largest
        action[:3] = np.clip(command, -1, 1)
        if yaw is not None:
            action[5] = float(np.clip(wrap(yaw - self.yaw) * YAW_GAIN, -MAX_YAW_ACTION, MAX_YAW_ACTION))
        action[6] = 1.0 if gripper > 0 else -1.0
        return action

    def act(self, obs: dict | None = None) -> np.ndarray:
        """The next 7-D action in [-1, 1] (after ``done``: hold still)."""
        if self.subtask is None:
            raise RuntimeError("call expert.reset(subtask) before act()")
        while not self.done:
            seg = self.segments[self.index]
            target = seg.target(self)
            finished = seg.until(self) if seg.until is not None else (self._near(target) and self._yaw_ok(seg.yaw))
            if finished or self.steps >= seg.limit:
                self.index += 1
                self.done = self.index >= len(self.segments)
                self._start_segment()
                continue
            self.steps += 1
            return self._move(target, seg.gripper, seg.yaw, seg.approach)
        gripper = float(self.env.raw_obs["robot_obs"][14])
        return self._move(self.tcp, gripper, None, approach=False)

    @property
    def phase(self) -> str:
        return "finished" if self.done else self.segments[self.index].name


# >= 90% in scripts/calvin_expert_check.py (single subtasks over 20 initial conditions each, and within
# 5-chains that end each subtask at the oracle's success; see the module docstring).
COVERED: tuple[str, ...] = ("open_drawer", "close_drawer", "move_slider_left", "move_slider_right",
                            "turn_on_lightbulb", "turn_off_lightbulb", "turn_on_led", "turn_off_led",
                            "lift_red_block_table", "lift_blue_block_table", "lift_pink_block_table",
                            "place_in_slider", "place_in_drawer", "stack_block")
