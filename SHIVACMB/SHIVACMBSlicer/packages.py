"""The Python packages SHIVA-CMB needs in Slicer (installed by pip in the background), and the model selector."""

import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from importlib import metadata
from typing import Callable, List, Optional, Sequence, Tuple

import qt

import slicer

from SHIVACMBLib.slicerside import slicerbridge

from .command import SHIVACMBCommand
from .nodes import TITLE

THRESHOLD_ROLE_OFFSET = 1  # model selector items: the model's own threshold, at Qt.UserRole + this


class PackagesLogic:
    """Packages and models (a mixin of SHIVACMBLogic)."""

    @staticmethod
    def missingPackages() -> List[str]:
        """pip requirements of the packages the command needs that Slicer's Python lacks (the onnxruntime build
        the `cpu` extra would choose here, or the GPU build where an NVIDIA GPU is found)."""
        onnxruntime = slicerbridge.onnxruntime_requirements(tuple(sys.version_info[:2]), sys.platform,
                                                            platform.machine(), shutil.which("nvidia-smi") is not None)
        return slicerbridge.missing_requirements(lambda name: importlib.util.find_spec(name) is not None, onnxruntime)

    def startInstallPackages(self, requirements: Sequence[str],
                             onFinished: Optional[Callable[[SHIVACMBCommand], None]] = None) -> SHIVACMBCommand:
        """pip-install in the background, without replacing the numpy, scipy, SimpleITK or pydicom Slicer ships."""
        command = self._pipCommand(requirements, onFinished)
        command.startPolling()
        return command

    def installPackages(self, requirements: Sequence[str]) -> None:
        """pip-install and wait (the self-test); RuntimeError when pip fails."""
        if not requirements:
            return
        command = self._pipCommand(requirements, None)
        command.wait()
        if command.status != "done":
            raise RuntimeError(f"pip could not install {', '.join(requirements)}: {command.errorMessage}")

    def _pipCommand(self, requirements: Sequence[str],
                    onFinished: Optional[Callable[[SHIVACMBCommand], None]]) -> SHIVACMBCommand:
        # What slicer.util.pip_install runs (PythonSlicer -m pip install, in Slicer's own environment),
        # but read line by line from the event loop instead of blocking Slicer until pip ends.
        tempDir = self.temporaryFolder("pip")
        try:
            constraints = os.path.join(tempDir, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as stream:
                stream.write(slicerbridge.pip_constraints(
                    {name: self._installedVersion(name) for name in slicerbridge.SLICER_PACKAGES}))
            args = slicerbridge.pip_install_command(self.pythonExecutable(), constraints, requirements)
            process = slicerbridge.ChildProcess(args, env=slicerbridge.child_environment(os.environ))
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise

        def finished(command: SHIVACMBCommand) -> None:
            importlib.invalidate_caches()
            if onFinished is not None:
                onFinished(command)

        logging.info(f"SHIVA-CMB started: {' '.join(args)}")
        return SHIVACMBCommand(process, tempDir, finished)

    @staticmethod
    def _installedVersion(distribution: str) -> Optional[str]:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    @staticmethod
    def listModels() -> Tuple[List[slicerbridge.ModelChoice], List[str]]:
        """Installed models as selector entries, and the model folders that cannot be used."""
        return slicerbridge.installed_model_choices()


class PackagesSection:
    """The panel's packages button and model selector (a mixin of SHIVACMBWidget)."""

    def refreshModels(self) -> None:
        """List the installed models (needs the Python packages of the command)."""
        self._missingPackages = self.logic.missingPackages()
        self._updateButtons()
        if self._missingPackages:
            self.ui.statusLabel.text = ("Before the first run, SHIVA-CMB needs these Python packages in Slicer: "
                                        + ", ".join(self._missingPackages) + ". Click 'Install Python packages'.")
            return
        with slicer.util.tryWithErrorDisplay("The installed models could not be listed.", waitCursor=True):
            choices, problems = self.logic.listModels()
            self._fillModelSelector(choices)
            self._modelsListed = True
            self.ui.statusLabel.text = self._modelListStatus(choices, problems)

    @staticmethod
    def _modelListStatus(choices: Sequence[slicerbridge.ModelChoice], problems: Sequence[str]) -> str:
        lines = []
        if not choices:
            lines.append("No CMB model is installed. Use 'Folder...' to choose a model folder (a folder with "
                         "model.json and its ONNX files), for example the SHIVA-CMB weights you obtained.")
        if problems:
            lines.append("Model folders that cannot be used:\n" + "\n".join(problems))
        return "\n".join(lines)

    def _fillModelSelector(self, choices: List[slicerbridge.ModelChoice]) -> None:
        """Fill the model selector; a model folder chosen earlier stays listed while it exists."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for choice in choices:
            self._addModelChoice(choice)
        combo.blockSignals(wasBlocked)
        self._showSelectedModel()

    def _addModelChoice(self, choice: slicerbridge.ModelChoice) -> None:
        combo = self.ui.modelComboBox
        if combo.findData(choice.value) < 0:
            combo.addItem(choice.label, choice.value)
            combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
            combo.setItemData(combo.count - 1, choice.threshold, qt.Qt.UserRole + THRESHOLD_ROLE_OFFSET)

    def _showSelectedModel(self) -> None:
        """Show the parameter node's model in the selector (a model folder is added to it).

        A model that is neither listed nor an existing folder is replaced by the first one listed.
        """
        combo = self.ui.modelComboBox
        if not self._parameterNode:
            return
        model = self._parameterNode.model
        if model and combo.findData(model) < 0 and os.path.isdir(model):
            wasBlocked = combo.blockSignals(True)
            try:
                self._addModelChoice(slicerbridge.model_folder_choice(model))
            except ValueError as err:
                logging.warning(str(err))
            combo.blockSignals(wasBlocked)
        if combo.count == 0:
            return
        index = combo.findData(model)
        if index < 0:
            self._parameterNode.model = combo.itemData(0)
            return
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)
        if model != self._thresholdModel:  # a model newly chosen brings its own threshold (the slider then moves it)
            self._thresholdModel = model
            own = combo.itemData(index, qt.Qt.UserRole + THRESHOLD_ROLE_OFFSET)
            if own is not None:
                self._parameterNode.threshold = float(own)

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onChooseModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a SHIVA-CMB model folder")
        if not folder:
            return
        try:
            choice = slicerbridge.model_folder_choice(folder)
        except ValueError as err:
            slicer.util.errorDisplay(str(err), windowTitle=TITLE)
            return
        self._addModelChoice(choice)
        if self._parameterNode:
            self._parameterNode.model = choice.value

    def onInstallPackages(self) -> None:
        """Install the missing packages with pip in the background (Slicer stays usable), after asking."""
        missing = self.logic.missingPackages()
        if not missing:
            self.refreshModels()
            return
        if not slicer.util.confirmOkCancelDisplay(
                "SHIVA-CMB needs these Python packages in Slicer's Python:\n\n" + "\n".join(missing)
                + "\n\nDownload and install them now? This may take a few minutes.", windowTitle=TITLE):
            return
        with slicer.util.tryWithErrorDisplay("The Python packages could not be installed.", waitCursor=True):
            self._install = self.logic.startInstallPackages(missing, onFinished=self.onInstallFinished)
        self.ui.progressBar.setRange(0, 0)  # busy: pip gives no overall progress
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Installing " + ", ".join(missing) + "..."
        self._updateButtons()

    def onInstallFinished(self, command: SHIVACMBCommand) -> None:
        self._install = None
        self.ui.progressBar.hide()
        self.ui.progressBar.setRange(0, 100)
        if command.status != "done":
            slicer.util.errorDisplay("The Python packages could not be installed.\n\n" + command.errorMessage,
                                     windowTitle=TITLE, detailedText="\n".join(command.lines))
        self.refreshModels()
