(function () {
  "use strict";
  var root = document.currentScript.parentElement;
  function q(role) { return root.querySelector('[data-role="' + role + '"]'); }
  var statusBox = q("status");
  function fail(message) {
    root.setAttribute("data-state", "error");
    statusBox.textContent = message + " The static slice montage of this report shows the same images.";
  }
  var NV = window.niivue;
  if (!NV || !NV.Niivue) { fail("The NiiVue library did not load."); return; }
  if (!document.createElement("canvas").getContext("webgl2")) {
    fail("This browser has no WebGL 2, which the interactive viewer needs."); return;
  }
  var data = JSON.parse(q("data").textContent);
  var entries = data.labels.entries;
  var labelNames = {};
  entries.forEach(function (x) { labelNames[x.value] = x.name; });
  var cmap = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: ["background"] };
  entries.forEach(function (x) {
    cmap.R.push(x.rgb[0]); cmap.G.push(x.rgb[1]); cmap.B.push(x.rgb[2]); cmap.A.push(255);
    cmap.I.push(x.value); cmap.labels.push(x.name);
  });
  var nv = new NV.Niivue({
    backColor: [0, 0, 0, 1], crosshairColor: [0.1, 1.0, 0.3, 0.6], crosshairWidth: 0.75, crosshairGap: 6,
    isRadiologicalConvention: data.radiological, sagittalNoseLeft: data.sagittal_nose_left,
    multiplanarLayout: NV.MULTIPLANAR_TYPE.GRID, multiplanarShowRender: NV.SHOW_RENDER.ALWAYS,
    show3Dcrosshair: true, dragAndDropEnabled: false, isColorbar: false, isNearestInterpolation: true,
    logLevel: "error", loadingText: "loading\u2026"
  });
  var cache = {};
  var state = { grey: 0, map: -1, seg: true };
  function opacity(role) { return Number(q(role).value) / 100; }
  async function volume(key) {
    if (cache[key]) return cache[key];
    var kind = key.charAt(0), i = Number(key.slice(1)), v;
    if (kind === "g") {
      var g = data.images[i];
      v = await NV.NVImage.loadFromBase64({ base64: g.b64, name: "grey" + i + ".nii.gz", colormap: "gray",
        cal_min: g.range[0], cal_max: g.range[1], colorbarVisible: false });
      v.medsegName = g.label;
    } else if (kind === "l") {
      v = await NV.NVImage.loadFromBase64({ base64: data.labels.b64, name: "labels.nii.gz",
        colorbarVisible: false });
      v.setColormapLabel(cmap);
      v.medsegName = "label";
    } else {
      var m = data.maps[i];
      v = await NV.NVImage.loadFromBase64({ base64: m.b64, name: "map" + i + ".nii.gz", colormap: m.colormap,
        cal_min: m.vmin + 0.5 * m.step, cal_max: m.vmax, colorbarVisible: true });
      v.medsegName = m.name; v.medsegUnits = m.units;
    }
    cache[key] = v;
    return v;
  }
  async function apply() {
    var want = [await volume("g" + state.grey)];
    var seg = await volume("l0");
    if (state.seg) want.push(seg);
    if (state.map >= 0) want.push(await volume("m" + state.map));
    seg.opacity = opacity("seg-opacity");
    if (state.map >= 0) want[want.length - 1].opacity = opacity("map-opacity");
    nv.opts.isColorbar = state.map >= 0;
    var same = want.length === nv.volumes.length && want.every(function (v, i) { return nv.volumes[i] === v; });
    if (same) {
      nv.updateGLVolume();  // opacity only
    } else {  // each of these updates the GPU volumes itself
      want.forEach(function (v) { if (nv.volumes.indexOf(v) < 0) nv.addVolume(v); });
      want.forEach(function (v, i) { if (nv.volumes.indexOf(v) !== i) nv.setVolume(v, i); });
      nv.volumes.slice().forEach(function (v) { if (want.indexOf(v) < 0) nv.removeVolume(v); });
    }
    nv.createOnLocationChange();
    root.querySelectorAll(".mdv-legend li[data-map]").forEach(function (li) {
      li.classList.toggle("mdv-off", Number(li.getAttribute("data-map")) !== state.map);
    });
    syncSlider();
  }
  var queue = Promise.resolve(), pending = false;
  function schedule() {  // one update at a time; requests made while one waits share it
    if (!pending) {
      pending = true;
      queue = queue.then(function () { pending = false; return apply(); })
        .catch(function (err) { fail("Viewer error: " + err); });
    }
    return queue;
  }
  function fmt(x) { return Math.abs(x) >= 100 ? x.toFixed(0) : Number(x.toPrecision(3)).toString(); }
  function syncSlider() {
    if (!nv.back) return;
    var axis = Number(q("plane").value), slider = q("slice");
    var vox = nv.frac2vox(nv.scene.crosshairPos), n = nv.back.dimsRAS[axis + 1];
    slider.max = String(n - 1);
    slider.value = String(Math.round(vox[axis]));
    q("slice-out").textContent = (Math.round(vox[axis]) + 1) + " / " + n;
  }
  function readout(loc) {
    var parts = [];
    if (loc.vox) parts.push("voxel (" + Array.from(loc.vox).join(", ") + ")");
    (loc.values || []).forEach(function (val, i) {
      var v = nv.volumes[i];
      if (!v) return;
      if (v.medsegName === "label") {
        var k = Math.round(val.value);
        parts.push(k ? "label " + k + ": " + (labelNames[k] || "?") : "no label");
      } else if (v.medsegUnits !== undefined) {
        parts.push(v.medsegName + " " + fmt(val.value) + " " + v.medsegUnits);
      } else {
        parts.push(v.medsegName + " " + fmt(val.value));
      }
    });
    statusBox.textContent = parts.join(" \u00b7 ");
  }
  function layout(value) {
    var T = NV.SLICE_TYPE;
    var types = { grid: T.MULTIPLANAR, axial: T.AXIAL, coronal: T.CORONAL, sagittal: T.SAGITTAL, render: T.RENDER };
    nv.setSliceType(types[value]);
    var plane = { axial: "2", coronal: "1", sagittal: "0" }[value];
    if (plane) { q("plane").value = plane; syncSlider(); }
  }
  function drawLegendBars() {
    root.querySelectorAll('canvas[data-role="cbar"]').forEach(function (c) {
      var m = data.maps[Number(c.getAttribute("data-map"))], lut = nv.colormap(m.colormap);
      var ctx = c.getContext("2d"), img = ctx.createImageData(c.width, c.height);
      for (var x = 0; x < c.width; x++) {
        var k = Math.round(x * 255 / (c.width - 1)) * 4;
        for (var y = 0; y < c.height; y++) {
          var o = (y * c.width + x) * 4;
          img.data[o] = lut[k]; img.data[o + 1] = lut[k + 1]; img.data[o + 2] = lut[k + 2]; img.data[o + 3] = 255;
        }
      }
      ctx.putImageData(img, 0, 0);
    });
  }
  async function start() {
    await nv.attachToCanvas(q("canvas"));
    nv.onLocationChange = function (loc) { readout(loc); syncSlider(); };
    await schedule();
    nv.scene.crosshairPos = nv.mm2frac(data.start_mm);
    nv.createOnLocationChange();
    nv.drawScene();
    drawLegendBars();
    q("grey").addEventListener("change", function (ev) { state.grey = Number(ev.target.value); schedule(); });
    q("map").addEventListener("change", function (ev) { state.map = Number(ev.target.value); schedule(); });
    q("seg").addEventListener("change", function (ev) { state.seg = ev.target.checked; schedule(); });
    q("seg-opacity").addEventListener("input", function () { schedule(); });
    q("map-opacity").addEventListener("input", function () { schedule(); });
    q("layout").addEventListener("change", function (ev) { layout(ev.target.value); });
    q("plane").addEventListener("change", syncSlider);
    q("slice").addEventListener("input", function (ev) {
      var axis = Number(q("plane").value), vox = nv.frac2vox(nv.scene.crosshairPos), d = [0, 0, 0];
      d[axis] = Number(ev.target.value) - Math.round(vox[axis]);
      if (d[axis]) nv.moveCrosshairInVox(d[0], d[1], d[2]);
    });
    q("canvas").addEventListener("keydown", function (ev) {  // arrows / page keys: slices of the chosen plane
      var step = { ArrowUp: 1, ArrowRight: 1, PageUp: 10, ArrowDown: -1, ArrowLeft: -1, PageDown: -10 }[ev.key];
      if (!step || !nv.back) return;
      ev.preventDefault();
      var d = [0, 0, 0];
      d[Number(q("plane").value)] = step;
      nv.moveCrosshairInVox(d[0], d[1], d[2]);
    });
    root.setAttribute("data-state", "ready");
  }
  var api = { root: root, nv: nv, ready: null, apply: schedule };
  window.medsegViewers = window.medsegViewers || [];
  window.medsegViewers.push(api);
  api.ready = start().catch(function (err) { fail("The viewer could not start: " + err); });
})();
