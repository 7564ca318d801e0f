"""A top-down waypoint expert for LIBERO-Object, driven by privileged poses.

    env = LiberoTaskEnv("libero_object", task_id, render=False)
    expert = LiberoObjectExpert(env)
    obs = env.reset(init_state_id)
    expert.reset(obs)
    while not expert.done:
        obs, reward, done, info = env.step(expert.act(obs))
    env.success()           # check after the release: `done` can fire while the object is still held

Gripper pointing down, orientation held at its start; fingers close along
world y. Per attempt: hover above the object, descend to a grasp height
derived from the object's height (aiming at its origin puts the fingers into
the table for flat boxes and onto the cap for tall bottles; a descent that
stalls before its waypoint would make the close depend on how long it has
stalled, which a policy cannot observe), close until the fingers stop on
it, lift until the object clears the basket rim, check that it rose with the
hand (else open and retry), carry it over the basket (a drop on the way is
also retried), lower, open, retreat. Object, neighbour and basket extents come
from the simulator's collision geometry, re-measured at every attempt (a
dropped bottle may lie on its side).
"""
from __future__ import annotations

import numpy as np

# Action units per metre of error (a sustained +1 moves ~1.2 cm/step). A well-damped gain:
# at 40 the OSC's lag made the hand overshoot every waypoint by centimetres and correct
# back (12-16 sign flips of the command per episode), a bang-bang pattern of +-1 labels
# that a cloned policy could not fit from its observations; at 10 the command decays
# smoothly onto each waypoint (1-4 flips; recorded episodes 155-207 steps instead of ~110-160).
POS_GAIN = 10.0
ROT_GAIN = 2.0           # per radian of orientation error (rotation scale 0.5 rad per unit)
# Orientation drifts of under ~3 degrees are left alone (zero rotation command; OSC holds the
# current orientation). A proportional correction of every small drift makes the rotation
# actions continuous noise of +-0.05 that quantile normalisation stretches over all 256 bins:
# unpredictable tokens that a policy cannot be confident about, for no gain in the task.
ROT_DEADBAND = 0.05      # radians
TOL = 0.008              # metres: a waypoint is reached
# While approaching a waypoint the largest position command is at least this. Under ~0.08 the
# OSC does not move the hand at all, so a purely proportional approach ended in a creep and a
# rest just outside TOL: frames that look the same and carry "keep going" until the stall
# counter fires. A policy that cannot see that counter learnt to creep for ever (the teacher,
# decoded left to right, sat above a bottle for 200 steps commanding -0.07). At 0.15 the hand
# keeps moving until the waypoint is reached.
MIN_APPROACH = 0.15
STALL_STEPS = 6          # a descent that stops moving for this long has met something
# The close ends once the fingers have stopped (on the object), at most CLOSE_STEPS. Waiting a
# fixed 12 steps held ~4-6 identical frames labelled "hold" before "lift": the same ambiguity.
CLOSE_STEPS = 12         # the Panda gripper needs ~10 steps to close on nothing
FINGERS_STILL = 2e-4     # metres of finger travel in one step that count as stopped
MIN_CLOSE_STEPS = 3      # the fingers take a step to start moving
OPEN_STEPS = 10
HOVER_ABOVE = 0.10       # hover this far above the grasp point before descending
# Tall objects are gripped this far below their top. Deeper (the finger length) puts the target
# below where the palm meets the cap: every descent ends in a stall, told only by its duration,
# so the demonstrations hold identical frames labelled "keep descending" before "close", and a
# cloned policy, which cannot see how long it has stalled, presses on the cap for ever. Here the
# descent reaches its waypoint and the close follows from the observed height (the depths tried
# are in docs/reference-model.md).
TALL_GRIP_BELOW_TOP = 0.038
RIM_CLEARANCE = 0.06     # object bottom above the basket rim while carrying
DROP_MARGIN = 0.03       # the object sank this far below the hand while carrying: it slipped out
MAX_RETRIES = 2
# the hand (palm) around the grip site, measured on the Panda in LIBERO: it spans
# about +-10 cm along the finger axis (world y) and sits ~2.4 cm above the grip site
PALM_HALF_X, PALM_HALF_Y, PALM_ABOVE_GRIP = 0.04, 0.105, 0.024
# phase -> step limit: a waypoint not reached by then is given up on (the next phase copes)
PHASE_LIMIT = {"hover": 60, "descend": 40, "lift": 60, "carry": 80, "lower": 30, "retreat": 20}


def _quat_mul(a, b):
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz])


def _quat_conj(q):
    return np.array([-q[0], -q[1], -q[2], q[3]])


def orientation_error(target_xyzw, current_xyzw) -> np.ndarray:
    """World-frame axis-angle rotating ``current`` onto ``target`` (quaternions x, y, z, w)."""
    q = _quat_mul(target_xyzw, _quat_conj(current_xyzw))
    if q[3] < 0:
        q = -q
    s = np.linalg.norm(q[:3])
    if s < 1e-9:
        return np.zeros(3)
    return q[:3] / s * 2 * np.arctan2(s, q[3])


def body_extent(sim, name: str) -> tuple[np.ndarray, np.ndarray]:
    """World-frame (low, high) corners of the collision geometry of object ``name``
    (its bodies are ``name`` and ``name_*``, e.g. ``basket_1_main``), in the current state."""
    model, data = sim.model._model, sim.data._data
    bodies = {b for b in range(model.nbody)
              if model.body(b).name == name or model.body(b).name.startswith(name + "_")}
    lows, highs = [], []
    for g in range(model.ngeom):
        if model.geom_bodyid[g] in bodies and model.geom_contype[g] != 0:  # collision geoms only
            rot = data.geom_xmat[g].reshape(3, 3)
            centre = data.geom_xpos[g] + rot @ model.geom_aabb[g][:3]
            half = np.abs(rot) @ model.geom_aabb[g][3:]
            lows.append(centre - half)
            highs.append(centre + half)
    if not lows:
        raise ValueError(f"no collision geometry for an object named {name!r}")
    return np.min(lows, axis=0), np.max(highs, axis=0)


class LiberoObjectExpert:
    """Stateful scripted expert for one :class:`~fast_dvla.envs.libero_env.LiberoTaskEnv`.

    ``reset(obs)`` after every ``env.reset``, then ``act(obs)`` once per step
    until ``done``. ``obs`` is the policy observation, accepted so that the
    expert drops into a policy's rollout loop; the expert itself reads the
    privileged state (``env.raw_obs``, the simulator's geometry), which always
    belongs to the latest observation. ``retries`` counts failed grasps.
    """

    def __init__(self, env):
        objects = env.object_of_interest
        if len(objects) != 2 or not objects[1].startswith("basket"):
            raise ValueError(f"LiberoObjectExpert places one object in a basket (LIBERO-Object); task "
                             f"{env.suite_name}/{env.task_id} concerns {objects}")
        self.env = env
        self.obj, self.basket = objects
        self.phase, self.done, self.retries = "idle", False, 0

    # --- planning -----------------------------------------------------------------------
    def reset(self, obs: dict | None = None) -> None:
        """Start a new episode from the environment's current (settled) state."""
        raw = self.env.raw_obs
        if not raw:
            raise RuntimeError("reset the environment before the expert")
        self.quat0 = np.array(raw["robot0_eef_quat"], dtype=np.float64)  # keep the hand as it starts: down
        _, basket_hi = body_extent(self.env.sim, self.basket)
        self.rim = float(basket_hi[2])
        self.retries = 0
        self._plan_grasp()
        self._start("hover")

    def _plan_grasp(self) -> None:
        """Grasp height and point from the object's current geometry."""
        raw = self.env.raw_obs
        lo, hi = body_extent(self.env.sim, self.obj)
        h = float(hi[2] - lo[2])
        self.obj_bottom_offset = float(raw[self.obj + "_pos"][2] - lo[2])  # origin above its lowest point
        # grip site above the object's bottom: mid-height for short objects, just
        # below the top for tall ones (see TALL_GRIP_BELOW_TOP), never into the table
        self.grasp_above_bottom = max(h / 2, h - TALL_GRIP_BELOW_TOP, 0.012)
        self.grasp_dx = self._grasp_offset_x(lo, hi)

    def _grasp_offset_x(self, lo, hi) -> float:
        """Where along world x (across the fingers) to grasp, relative to the object's
        origin: the palm must not come down on a neighbour taller than its lowest point."""
        raw = self.env.raw_obs
        centre_x, gy = float(raw[self.obj + "_pos"][0]), float(raw[self.obj + "_pos"][1])
        palm_bottom = float(lo[2]) + self.grasp_above_bottom + PALM_ABOVE_GRIP
        neighbours = []
        for name in self.env.object_names:
            if name == self.obj:
                continue
            n_lo, n_hi = body_extent(self.env.sim, name)
            if n_hi[2] > palm_bottom:
                neighbours.append((n_lo, n_hi))
        best, best_cost = 0.0, None
        margin = min(0.012, (hi[0] - lo[0]) / 2)
        for gx in np.linspace(lo[0] + margin, hi[0] - margin, 11):
            cost = 0.0
            for n_lo, n_hi in neighbours:  # overlap area of the palm's footprint with the neighbour's
                ox = min(gx + PALM_HALF_X, n_hi[0]) - max(gx - PALM_HALF_X, n_lo[0])
                oy = min(gy + PALM_HALF_Y, n_hi[1]) - max(gy - PALM_HALF_Y, n_lo[1])
                if ox > -0.01 and oy > 0:  # keep 1 cm of clearance
                    cost += (ox + 0.01) * oy
            cost += 1e-3 * abs(gx - centre_x)  # otherwise prefer the middle
            if best_cost is None or cost < best_cost:
                best, best_cost = float(gx - centre_x), cost
        return best

    # --- control ------------------------------------------------------------------------
    def _start(self, phase: str) -> None:
        self.phase, self.phase_steps, self._last_z, self._still = phase, 0, None, 0
        self._last_fingers = None
        self.done = phase == "finished"

    def _retry(self) -> None:
        self.retries += 1
        if self.retries > MAX_RETRIES:
            self._start("finished")
        else:
            self._start("reopen")

    def _move(self, raw, target, gripper: float, approach: bool = False) -> np.ndarray:
        """Proportional command towards ``target``; ``approach``: at least MIN_APPROACH until within TOL."""
        eef = raw["robot0_eef_pos"]
        action = np.zeros(7)
        err = np.asarray(target) - eef
        command = err * POS_GAIN
        largest = np.abs(command).max()
        if approach and np.linalg.norm(err) >= TOL and 0 < largest < MIN_APPROACH:
            command *= MIN_APPROACH / largest
        action[:3] = np.clip(command, -1, 1)
        rot_err = orientation_error(self.quat0, raw["robot0_eef_quat"])
        if np.linalg.norm(rot_err) > ROT_DEADBAND:
            action[3:6] = np.clip(rot_err * ROT_GAIN, -1, 1)
        action[6] = gripper
        return action

    def _stalled(self, z: float) -> bool:
        if self._last_z is not None and abs(z - self._last_z) < 5e-4:
            self._still += 1
        else:
            self._still = 0
        self._last_z = z
        return self._still >= STALL_STEPS

    def _fingers_stopped(self, raw) -> bool:
        fingers = np.asarray(raw["robot0_gripper_qpos"], dtype=np.float64)
        last, self._last_fingers = self._last_fingers, fingers
        return last is not None and float(np.abs(fingers - last).max()) < FINGERS_STILL

    def _timed_out(self) -> bool:
        return self.phase_steps > PHASE_LIMIT.get(self.phase, 10 ** 9)

    def act(self, obs: dict | None = None) -> np.ndarray:
        """The next 7-D action in [-1, 1] (after ``done``: hold still, gripper open)."""
        raw = self.env.raw_obs
        self.phase_steps += 1
        eef = np.asarray(raw["robot0_eef_pos"])
        obj = np.asarray(raw[self.obj + "_pos"])
        basket = np.asarray(raw[self.basket + "_pos"])
        obj_bottom = obj[2] - self.obj_bottom_offset
        grasp_z = obj_bottom + self.grasp_above_bottom
        carry_z = grasp_z + (self.rim + RIM_CLEARANCE - obj_bottom)  # hand height that clears the rim
        near = lambda target: np.linalg.norm(np.asarray(target) - eef) < TOL  # noqa: E731
        gx = obj[0] + self.grasp_dx
        p = self.phase

        if p == "hover":
            target = [gx, obj[1], grasp_z + HOVER_ABOVE]
            if near(target) or self._timed_out():
                self._start("descend")
            return self._move(raw, target, -1, approach=True)
        if p == "descend":
            target = [gx, obj[1], grasp_z]
            if near(target) or self._stalled(eef[2]) or self._timed_out():
                self._start("close")
                self._grasp_obj_z = obj[2]
            return self._move(raw, target, -1, approach=True)
        if p == "close":
            stopped = self._fingers_stopped(raw)
            if (stopped and self.phase_steps >= MIN_CLOSE_STEPS) or self.phase_steps >= CLOSE_STEPS:
                self._start("lift")
                self._hold_offset = eef[2] - obj[2]  # hand above object while it is held
            return self._move(raw, [gx, obj[1], grasp_z], 1)
        if p == "lift":
            target = [eef[0], eef[1], carry_z]
            stayed = obj[2] < self._grasp_obj_z + 0.02  # the object did not rise with the hand
            if stayed and (self.phase_steps > 15 or near(target)):
                self._retry()
                return self._move(raw, eef, -1)
            if near(target) or self._timed_out():
                self._start("carry")
            return self._move(raw, target, 1, approach=True)
        if p == "reopen":  # open and back off upwards before the next attempt
            if self.phase_steps >= OPEN_STEPS:
                self._plan_grasp()  # where the object lies now
                self._start("hover")
            return self._move(raw, [eef[0], eef[1], eef[2] + 0.02], -1)
        if p == "carry":
            if eef[2] - obj[2] > self._hold_offset + DROP_MARGIN:  # slipped out on the way
                self._retry()
                return self._move(raw, eef, -1)
            target = [basket[0], basket[1], carry_z]
            if np.linalg.norm((target - eef)[:2]) < 0.01 or self._timed_out():
                self._start("lower")
            return self._move(raw, target, 1, approach=True)
        if p == "lower":
            target = [basket[0], basket[1], carry_z - RIM_CLEARANCE + 0.02]
            if near(target) or self._stalled(eef[2]) or self._timed_out():
                self._start("release")
            return self._move(raw, target, 1, approach=True)
        if p == "release":
            if self.phase_steps >= OPEN_STEPS:
                self._start("retreat")
            return self._move(raw, eef, -1)
        if p == "retreat":
            target = [eef[0], eef[1], carry_z + 0.05]
            if near(target) or self._timed_out():
                self._start("finished")
            return self._move(raw, target, -1, approach=True)
        if p == "idle":
            raise RuntimeError("call expert.reset(obs) after env.reset() before act()")
        return self._move(raw, eef, -1)  # finished: hold still, open
